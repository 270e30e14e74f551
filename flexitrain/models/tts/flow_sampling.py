"""Euler ODE sampler with classifier-free guidance and prompt infilling for the Voicebox NAR (tts.md §2.6).

From noise at t = 0 to data at t = 1 in ``n_timesteps`` equal steps; the velocity of step i is evaluated
at the interval midpoint ``t_i = (i + 0.5) / n`` (1 NFE per pass). The prompt mel is kept clean and
prepended to x_t in the conditional pass; the unconditional pass sees x_t alone with a zero condition
(the training-time drop). Guidance: ``v = v_c + cfg·(v_c − v_u)``, then rescaled towards the standard
deviation of ``v_c``: ``v ← r·v·std(v_c)/std(v) + (1 − r)·v``.

Deviations from the released sampler, both no-ops for one utterance whose prompt mel and prompt codes
agree in length: the guidance std is taken per item (released: over the whole batch), and a prompt whose
mel is longer/shorter than its codes (4 frames per 12.5 Hz code) is cut to the common length so the
generated frames keep their own condition (released: misaligned, tts.md B8).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def _item_std(x: Tensor) -> Tensor:
    return x.flatten(1).std(dim=1).view(-1, 1, 1)


@torch.no_grad()
def sample_mel(model: nn.Module, cond: Tensor, prompt: Tensor | None = None, *, n_timesteps: int = 15,
               cfg: float = 2.0, rescale_cfg: float = 0.75, noise: Tensor | None = None,
               seed: int | None = None, generator: torch.Generator | None = None,
               x_mask: Tensor | None = None, prompt_cond_frames: int | None = None,
               batch_guidance: bool = True) -> Tensor:
    """Generate the target mel ``[B, T_target, mel]``.

    model: a `VoiceBox` (called as ``model(x_t, t, cond, x_mask)``, with ``model.mel_dim``).
    cond: 50 Hz condition ``[B, T_prompt_cond + T_target, H]`` (prompt part first).
    prompt: clean prompt mel ``[B, T_prompt, mel]`` or None; ``prompt_cond_frames``: how many cond frames
    belong to the prompt (default ``T_prompt``). x_mask: target validity ``[B, T_target]`` (default all).
    noise: the initial x_0; else drawn from ``generator`` / ``seed`` (same seed → same output).
    batch_guidance: run the conditional and unconditional passes as one 2B batch (same result).
    """
    if n_timesteps < 1:
        raise ValueError(f"n_timesteps must be >= 1, got {n_timesteps}")
    if cond.dim() != 3:
        raise ValueError(f"cond must be [B, T, H], got {tuple(cond.shape)}")
    B, device, dtype = cond.shape[0], cond.device, cond.dtype
    mel_dim = model.mel_dim
    if prompt is None:
        prompt = cond.new_zeros(B, 0, mel_dim)
    if prompt.dim() != 3 or prompt.shape[0] != B or prompt.shape[2] != mel_dim:
        raise ValueError(f"prompt must be [B={B}, T, {mel_dim}], got {tuple(prompt.shape)}")
    n_cond_prompt = prompt.shape[1] if prompt_cond_frames is None else int(prompt_cond_frames)
    if not 0 <= n_cond_prompt < cond.shape[1]:
        raise ValueError(f"cond has {cond.shape[1]} frames: nothing left to generate after a "
                         f"{n_cond_prompt}-frame prompt")
    n_prompt = min(prompt.shape[1], n_cond_prompt)
    prompt = prompt[:, :n_prompt].to(dtype)
    cond = torch.cat([cond[:, :n_prompt], cond[:, n_cond_prompt:]], dim=1)
    target_len = cond.shape[1] - n_prompt

    if x_mask is None:
        x_mask = torch.ones(B, target_len, device=device)
    if x_mask.shape != (B, target_len):
        raise ValueError(f"x_mask must be [B, T_target] = [{B}, {target_len}], got {tuple(x_mask.shape)}")
    full_mask = torch.cat([torch.ones(B, n_prompt, device=device), x_mask.to(device).float()], dim=1)
    if noise is None:
        if generator is None and seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(int(seed))
        noise = torch.randn(B, target_len, mel_dim, generator=generator, dtype=torch.float32).to(device, dtype)
    if noise.shape != (B, target_len, mel_dim):
        raise ValueError(f"noise must be [{B}, {target_len}, {mel_dim}], got {tuple(noise.shape)}")

    guided = cfg > 0
    if guided and batch_guidance:
        # Unconditional rows: x_t at positions 0..T_target-1, zero cond, padded (masked) to the same length.
        pad = torch.zeros(B, n_prompt, device=device)
        both_mask = torch.cat([full_mask, torch.cat([x_mask.float(), pad], dim=1)])
        both_cond = torch.cat([cond, torch.zeros_like(cond)])
    h = 1.0 / n_timesteps
    x = noise
    for i in range(n_timesteps):
        t = torch.full((B,), (i + 0.5) * h, device=device, dtype=dtype)
        x_in = torch.cat([prompt, x], dim=1)
        if guided and batch_guidance:
            x_u = torch.cat([x, torch.zeros_like(prompt)], dim=1)
            v = model(torch.cat([x_in, x_u]), torch.cat([t, t]), both_cond, both_mask)
            v_c, v_u = v[:B, n_prompt:], v[B:, :target_len]
        else:
            v_c = model(x_in, t, cond, full_mask)[:, n_prompt:]
            v_u = model(x, t, torch.zeros_like(cond[:, :target_len]), x_mask) if guided else None
        if guided:
            v_cfg = v_c + cfg * (v_c - v_u)
            v_c = rescale_cfg * v_cfg * _item_std(v_c) / _item_std(v_cfg) + (1 - rescale_cfg) * v_cfg
        x = x + h * v_c
    return x
