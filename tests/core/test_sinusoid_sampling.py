"""The sinusoid source draws a whole meta-batch in one call: bit-identical to the draw-by-draw definition."""

import pytest
import torch

from meta_train.tasks import TaskBatch
from meta_train.tasks.sinusoid import SinusoidOptions, SinusoidSource


def draw_by_draw(source, batch, shots, query, generator) -> TaskBatch:
    """The published definition, one draw after another: amplitudes, phases, support x, query x."""
    amp, phase = source._tasks(batch, generator)
    sx, sy = source._points(amp, phase, shots, generator)
    qx, qy = source._points(amp, phase, query, generator)
    return TaskBatch(sx, sy, qx, qy)


@pytest.mark.parametrize("batch,shots,query", [(25, 10, 10), (100, 10, 10), (7, 5, 13), (1, 1, 1), (64, 20, 3), (3, 0, 4)])
def test_sample_is_bit_identical_to_draw_by_draw(batch, shots, query):
    source = SinusoidSource(SinusoidOptions(amplitude_min=0.3, phase_max=2.0, x_min=-4.0, x_max=6.0))
    g1, g2 = torch.Generator().manual_seed(batch + shots), torch.Generator().manual_seed(batch + shots)
    for _ in range(3):  # and the generator is left in the same state
        got, want = source.sample("train", batch, shots, query, g1), draw_by_draw(source, batch, shots, query, g2)
        for a, b in zip((got.support_x, got.support_y, got.query_x, got.query_y),
                        (want.support_x, want.support_y, want.query_x, want.query_y)):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert torch.equal(a, b)
    assert torch.equal(g1.get_state(), g2.get_state())
