"""Deep supervision keeps one segment's activations per step (supervision_memory.py): what a
supervised step saves for backward does not depend on the segments before it, while chaining the
same segments without detaching saves them all."""

from supervision_memory import saved_per_step, saved_undetached


def test_a_supervised_step_saves_the_same_bytes_after_any_number_of_segments():
    one, four = saved_per_step(1, d_model=32), saved_per_step(4, d_model=32)
    assert one > 0 and four == one


def test_chained_segments_without_detaching_save_every_segment():
    one, three = saved_undetached(1, d_model=32), saved_undetached(3, d_model=32)
    assert 2.5 * one < three < 3.5 * one
