import contextlib
import warnings

import pytest
import torch
import torch_pruning as tp
from torch import nn

from yoloprune.graphs.dependency import CoupledGraph, channel_groups, conv_channels
from yoloprune.graphs.errors import ModelError


class ChunkNet(nn.Module):
    """A conv whose output is chunked; the pieces are consumed in the order ``mode`` says."""

    def __init__(self, mode: str, channels: int = 8, chunks: int = 2):
        super().__init__()
        self.mode, self.chunks = mode, chunks
        piece = -(-channels // chunks)
        last = channels - piece * (chunks - 1)
        self.a = nn.Conv2d(3, channels, 1)
        self.b = nn.Conv2d(piece, 5, 1)
        self.c = nn.Conv2d(last, 6, 1)
        self.d = nn.Conv2d(last, 2, 1)

    def forward(self, x):
        pieces = self.a(x).chunk(self.chunks, 1)
        p, q = pieces[0], pieces[-1]
        if self.mode == "reversed":  # the second piece is consumed first
            return self.c(q), self.b(p)
        if self.mode == "shared":  # one piece feeds two consumers
            return self.b(p), self.c(q), self.d(q)
        return self.b(p), self.c(q)


def consumer_inputs(graph, net, channel: int) -> dict[str, list[int]]:
    group = graph.get_pruning_group(net.a, tp.prune_conv_out_channels, [channel])
    return {
        graph._module2name[dep.target.module]: sorted(idxs)
        for dep, idxs in group
        if dep.target.module in (net.b, net.c, net.d)
    }


def build(graph_cls, net):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return graph_cls().build_dependency(net, torch.randn(1, 3, 4, 4), verbose=False)


@pytest.mark.parametrize("mode", ["ordered", "reversed", "shared"])
def test_chunk_channels_map_to_the_right_consumer(mode):
    net = ChunkNet(mode)
    graph = build(CoupledGraph, net)
    assert consumer_inputs(graph, net, 1) == {"b": [1]}
    expected = {"c": [1], "d": [1]} if mode == "shared" else {"c": [1]}
    assert consumer_inputs(graph, net, 5) == expected


def test_uneven_chunk():
    net = ChunkNet("reversed", channels=7, chunks=2)  # pieces of 4 and 3
    graph = build(CoupledGraph, net)
    assert consumer_inputs(graph, net, 3) == {"b": [3]}
    assert consumer_inputs(graph, net, 4) == {"c": [0]}


def test_upstream_torch_pruning_still_gets_chunk_wrong():
    """Pins the trap our CoupledGraph works around (torch-pruning 1.6.1, torch 2.x): chunk
    records `_saved_split_size`, and the fallback maps pieces in trace order. If this fails,
    upstream fixed it: drop CoupledGraph._fix_split_offsets."""
    net = ChunkNet("reversed")
    graph = build(tp.DependencyGraph, net)
    assert consumer_inputs(graph, net, 5) != {"c": [1]}


def test_layer_reading_two_pieces_is_refused():
    class TwoPieces(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            p, q = self.a(x).chunk(2, 1)
            return self.b(torch.cat([q, p], 1))

    with pytest.raises(ModelError, match="several pieces of one channel split"):
        build(CoupledGraph, TwoPieces())


def test_groups_cover_every_conv_output_once(tiny_model):
    groups = channel_groups(tiny_model)
    owners = {}
    for g in groups:
        for m in g.members:
            if m.kind == "out" and isinstance(tiny_model.get_submodule(m.layer), nn.Conv2d):
                assert m.layer not in owners, f"{m.layer} in {owners.get(m.layer)} and {g.id}"
                owners[m.layer] = g.id
    convs = {n for n, m in tiny_model.named_modules() if isinstance(m, nn.Conv2d)}
    assert set(owners) == convs


def test_head_outputs_are_protected(tiny_model):
    groups = {g.id: g for g in channel_groups(tiny_model)}
    for i in range(3):
        head = groups[f"model.24.m.{i}"]
        assert head.protected and head.size == 3 * (3 + 5)
    assert sum(g.protected for g in groups.values()) == 3


def test_residual_and_concat_coupling(tiny_model):
    groups = {g.id: g for g in channel_groups(tiny_model)}
    # C3 with shortcut: cv1's outputs are added to every bottleneck's output.
    residual = {str(m) for m in groups["model.4.cv1.conv"].members}
    assert {
        "model.4.cv1.conv.out",
        "model.4.m.0.cv2.conv.out",
        "model.4.m.1.cv2.conv.out",
        "model.4.m.1.cv1.conv.in",
    } <= residual
    # C3's second branch lands in the upper half of cv3's input concat.
    cv2_members = {(m.layer, m.kind): m for m in groups["model.4.cv2.conv"].members}
    upper = cv2_members[("model.4.cv3.conv", "in")]
    assert (upper.start, upper.stop, upper.of) == (32, 64, 64)
    # SPPF concatenates cv1's output with three poolings of it: four copies.
    sppf = {(m.layer, m.kind): m for m in groups["model.9.cv1.conv"].members}
    assert sppf[("model.9.cv2.conv", "in")].copies == 4


def test_conv_channels_account_for_every_input(tiny_model):
    groups = channel_groups(tiny_model)
    for conv in conv_channels(tiny_model, groups):
        module = tiny_model.get_submodule(conv.name)
        assert sum(n for _, n, _ in conv.in_slices) == module.in_channels
        assert conv.out_group is not None


@pytest.fixture
def sigint_ignored():
    """As in a process started in the background or under nohup: SIGINT is ignored, so a guard
    that relied on interrupt_main (a simulated SIGINT) would never stop its body."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGINT, previous)


def _spin(seconds: float) -> int:
    import time

    end, count = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        count += 1
    return count


def test_guard_stops_a_body_past_its_time_even_with_sigint_ignored(sigint_ignored):
    import time

    from yoloprune.graphs.dependency import GroupingLimits, grouping_guard

    start = time.monotonic()
    stopped = pytest.raises(ModelError, match=r"grouping: channel-group building stopped, it ran")
    limit = grouping_guard(GroupingLimits(seconds=0.2), "grouping")
    swallowing = contextlib.suppress(Exception)  # traced code swallowing errors can't swallow it
    with stopped, limit, swallowing:
        _spin(20)
    assert time.monotonic() - start < 5


def test_guard_stops_a_body_whose_memory_grows_even_with_sigint_ignored(sigint_ignored):
    from yoloprune.graphs.dependency import GroupingLimits, grouping_guard

    hoard = []
    stopped = pytest.raises(ModelError, match="stopped, memory grew by")
    with stopped, grouping_guard(GroupingLimits(seconds=60, memory_gib=0.1), "tracing"):
        for _ in range(2000):  # up to 2 GiB, touched page by page
            hoard.append(bytearray(2**20))
            hoard[-1][::4096] = b"\1" * len(hoard[-1][::4096])
    assert len(hoard) < 1000  # stopped well before the loop's end
    hoard.clear()


def test_guard_leaves_a_body_under_its_limits_alone():
    import time

    from yoloprune.graphs.dependency import GroupingLimits, grouping_guard

    with grouping_guard(GroupingLimits(seconds=0.3), "grouping"):
        count = _spin(0.05)
    assert count > 0
    time.sleep(0.5)  # past the limit now: nothing may be raised after the body is over
    ctrl_c = pytest.raises(KeyboardInterrupt)  # a user's Ctrl-C stays a KeyboardInterrupt
    with ctrl_c, grouping_guard(GroupingLimits(), "grouping"):
        raise KeyboardInterrupt


def test_split_halves_are_tied_and_a_whole_member_keeps_its_tie_whole():
    """Halves of split blocks keep equal counts; where one half cannot be pruned, its partner
    is kept whole, and so is every group tied to that partner through another block."""
    from yoloprune.graphs.dependency import ChannelGroup, Member, tie_split_halves

    def group(name, protected=False):
        return ChannelGroup(name, 16, (Member(name, "out", 0, 16, 16),), protected, "")

    groups = [group("a"), group("b"), group("c"), group("d"), group("e", protected=True)]
    halves = [("blk1", "C3k2", ("a", "b")), ("blk2", "C2PSA", ("d", "e"))]
    tied = {g.id: g for g in tie_split_halves(halves, groups)}
    assert tied["a"].tie == tied["b"].tie == "blk1" and not tied["a"].protected
    assert tied["d"].protected and "needs equal halves" in tied["d"].reason
    assert not tied["c"].protected and tied["c"].tie == ""
    chained = [*halves, ("blk3", "C3k2", ("b", "d"))]  # b is also a half of d's block
    tied = {g.id: g for g in tie_split_halves(chained, groups)}
    assert all(tied[n].protected for n in "abd")  # d is whole, so b, so a
    assert not tied["c"].protected
