"""Models: families, safe loading, YAML validation, the coupled-channel graph and pruning plans."""
