"""`task.compile`: compiled modules give the eager losses and gradients; state-dict keys are unchanged.

The default test traces with the `aot_eager` backend (the graphs torch.compile builds, run through ATen without
generated kernels: quick on CPU). The `inductor` test (generated, fused kernels) is slow on 2 cores: `-m slow`.
"""
from __future__ import annotations

import copy

import pytest
import torch
from hydra.utils import instantiate

from codec_fixtures import MICRO_MODEL, MICRO_TASK
from flexitrain.losses.adversarial import generator_gan_terms
from flexitrain.tasks.compiling import codec_compile_targets, compile_modules, compile_options
from flexitrain.utils.config import compose
from test_codec_task import speechlike_batch


def _task():
    torch.manual_seed(0)
    return instantiate(compose([*MICRO_MODEL, *MICRO_TASK, "task.disc_start_step=0"]).task, _recursive_=False)


def _losses_and_grads(task, batch):
    """The generator-side losses of one step and the generator's gradients of their sum."""
    for p in task.parameters():
        p.grad = None
    torch.manual_seed(1)  # quantizer dropout draws
    terms, _, fake, real = task.generator_losses(batch, 0.9, False)
    terms["adv"], terms["feat"] = generator_gan_terms(task.discriminator, fake, real)
    sum(terms.values()).backward()
    grads = {n: p.grad.clone() for n, p in task.generator.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in terms.items()}, grads


def _compare(backend: str, loss_rtol: float, grad_rtol: float):
    eager = _task()
    batch = speechlike_batch()
    want, want_g = _losses_and_grads(eager, batch)
    compiled = copy.deepcopy(eager)
    keys = list(compiled.state_dict())
    names = compile_modules(codec_compile_targets(compiled.generator, compiled.discriminator, compiled.mel_loss,
                                                  compiled._teacher[0]), compile_options({"backend": backend}))
    assert {"generator.dac.encoder", "generator.dac.decoder", "mel_loss", "teacher.encoder"} <= set(names)
    assert list(compiled.state_dict()) == keys  # compiled in place: checkpoints are unchanged
    got, got_g = _losses_and_grads(compiled, batch)
    assert set(got) == set(want) and set(got_g) == set(want_g)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=loss_rtol, atol=0.0, msg=f"loss {k}")
    # Gradients that vanish analytically (weight norm's v-gradient of a 1x1 conv with one input channel is
    # exactly 0) are pure cancellation noise, of the order eps x the largest gradients that cancelled: each
    # tensor is compared relative to its own largest entry, floored at grad_rtol x the largest gradient overall.
    floor = grad_rtol * max(float(g.abs().max()) for g in want_g.values())
    for k in want_g:
        err = float((got_g[k] - want_g[k]).abs().max())
        assert err <= grad_rtol * float(want_g[k].abs().max()) + floor, f"gradient of {k}: |Δ| {err:.3g}"


def test_compiled_graphs_give_the_eager_losses_and_gradients():
    # aot_eager runs the traced ATen graph: the same kernels in the same order, so the same numbers up to the
    # reassociation AOT autograd may do in backward (a few float32 ulps of the largest gradient entry).
    _compare("aot_eager", loss_rtol=1e-6, grad_rtol=1e-5)


@pytest.mark.slow
def test_inductor_kernels_match_eager_within_fusion_rounding():
    # Inductor fuses element-wise chains and may reassociate reductions: float32 relative rounding of ~1e-6 per
    # op, grown through ~100 layers of backward, stays below 1e-3 of each tensor's largest entry.
    _compare("inductor", loss_rtol=1e-4, grad_rtol=1e-3)


def test_compile_option_errors_name_the_key():
    with pytest.raises(ValueError, match="task.compile: unknown keys"):
        compile_options({"modee": "max-autotune"})
    assert compile_options(False)["enabled"] is False and compile_options({"mode": "reduce-overhead"})["enabled"]
