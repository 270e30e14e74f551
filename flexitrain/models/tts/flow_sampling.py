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

`sample_mel_batch` samples utterances of different lengths together: each Euler step is one model call on
2B padded rows (B conditional, B unconditional), with the key padding mask keeping padded frames out of the
real ones' attention; each utterance equals its own `sample_mel` up to float rounding.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def _item_std(x: Tensor) -> Tensor:
    return x.flatten(1).std(dim=1).view(-1, 1, 1)


def _align_prompt(cond: Tensor, prompt: Tensor | None, prompt_cond_frames: int | None,
                  mel_dim: int) -> tuple[Tensor, Tensor, int, int]:
    """Check the inputs and cut the prompt mel and its condition to a common length: returns
    (cond [B, n_prompt + target_len, H], prompt [B, n_prompt, mel], n_prompt, target_len)."""
    if cond.dim() != 3:
        raise ValueError(f"cond must be [B, T, H], got {tuple(cond.shape)}")
    B = cond.shape[0]
    if prompt is None:
        prompt = cond.new_zeros(B, 0, mel_dim)
    if prompt.dim() != 3 or prompt.shape[0] != B or prompt.shape[2] != mel_dim:
        raise ValueError(f"prompt must be [B={B}, T, {mel_dim}], got {tuple(prompt.shape)}")
    n_cond_prompt = prompt.shape[1] if prompt_cond_frames is None else int(prompt_cond_frames)
    if not 0 <= n_cond_prompt < cond.shape[1]:
        raise ValueError(f"cond has {cond.shape[1]} frames: nothing left to generate after a "
                         f"{n_cond_prompt}-frame prompt")
    n_prompt = min(prompt.shape[1], n_cond_prompt)
    cond = torch.cat([cond[:, :n_prompt], cond[:, n_cond_prompt:]], dim=1)
    return cond, prompt[:, :n_prompt].to(cond.dtype), n_prompt, cond.shape[1] - n_prompt


def _initial_noise(B: int, target_len: int, mel_dim: int, seed: int | None, generator: torch.Generator | None,
                   device, dtype) -> Tensor:
    # Drawn on the CPU in float32 whatever the device / dtype: the same seed gives the same x_0 everywhere.
    if generator is None and seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(B, target_len, mel_dim, generator=generator, dtype=torch.float32).to(device, dtype)


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
    mel_dim = model.mel_dim
    cond, prompt, n_prompt, target_len = _align_prompt(cond, prompt, prompt_cond_frames, mel_dim)
    B, device, dtype = cond.shape[0], cond.device, cond.dtype

    if x_mask is None:
        x_mask = torch.ones(B, target_len, device=device)
    if x_mask.shape != (B, target_len):
        raise ValueError(f"x_mask must be [B, T_target] = [{B}, {target_len}], got {tuple(x_mask.shape)}")
    full_mask = torch.cat([torch.ones(B, n_prompt, device=device), x_mask.to(device).float()], dim=1)
    if noise is None:
        noise = _initial_noise(B, target_len, mel_dim, seed, generator, device, dtype)
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


def _masked_item_std(x: Tensor, mask: Tensor, count: Tensor) -> Tensor:
    """`_item_std` over the masked frames only: x ``[B, T, mel]``, mask ``[B, T, 1]``, count ``[B]`` elements."""
    mean = torch.where(mask, x, 0).sum(dim=(1, 2)) / count
    dev = torch.where(mask, x - mean.view(-1, 1, 1), 0)
    return (dev.pow(2).sum(dim=(1, 2)) / (count - 1)).sqrt().view(-1, 1, 1).to(x.dtype)


def _gather_frames(x: Tensor, index: Tensor) -> Tensor:
    """``x[b, index[b, j]]`` for ``x [B, T, C]`` and ``index [B, T]``."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[2]))


@torch.no_grad()
def sample_mel_batch(model: nn.Module, conds: list[Tensor], prompts: list[Tensor | None] | None = None, *,
                     prompt_cond_frames: list[int | None] | None = None, n_timesteps: int = 15,
                     cfg: float = 2.0, rescale_cfg: float = 0.75, noises: list[Tensor] | None = None,
                     seeds: list[int | None] | None = None) -> list[Tensor]:
    """`sample_mel` for several utterances of different lengths at once; returns their mels ``[T_target_b, mel]``.

    conds[b]: ``[T_b, H]``; prompts[b]: ``[T_prompt_b, mel]`` or None; prompt_cond_frames[b], noises[b]
    (``[T_target_b, mel]``) and seeds[b] as in `sample_mel`. Utterance b equals
    ``sample_mel(model, conds[b][None], prompts[b][None], ..., seed=seeds[b])[0]`` up to float rounding (the
    model sees differently shaped tensors): its noise is drawn alone from its own seed, then padded.

    Layouts (P_b prompt frames, L_b target frames, T = max_b(P_b + L_b), padding at the end so RoPE positions
    are those of the one-utterance call): the conditional row b is ``[prompt_b ; x_b ; pad]``, the
    unconditional row ``[x_b ; pad]`` with a zero condition; the key padding mask hides every pad frame. The
    state is kept in the conditional layout and moved to / from the unconditional one by a gather.
    """
    if n_timesteps < 1:
        raise ValueError(f"n_timesteps must be >= 1, got {n_timesteps}")
    B = len(conds)
    for name, arg in (("prompts", prompts), ("prompt_cond_frames", prompt_cond_frames), ("noises", noises),
                      ("seeds", seeds)):
        if arg is not None and len(arg) != B:
            raise ValueError(f"{name} has {len(arg)} entries for {B} conds")
    if B == 0:
        return []
    mel_dim, device, dtype = model.mel_dim, conds[0].device, conds[0].dtype
    rows, cond_rows, n_prompt, n_target = [], [], [], []
    for b in range(B):  # per-utterance set-up, outside the Euler loop
        if conds[b].dim() != 2:
            raise ValueError(f"conds[{b}] must be [T, H], got {tuple(conds[b].shape)}")
        prompt = None if prompts is None or prompts[b] is None else prompts[b][None]
        cond, prompt, p, n = _align_prompt(conds[b][None], prompt, None if prompt_cond_frames is None
                                           else prompt_cond_frames[b], mel_dim)
        if noises is not None:
            noise = noises[b].to(device, dtype)[None]
            if noise.shape != (1, n, mel_dim):
                raise ValueError(f"noises[{b}] must be [{n}, {mel_dim}], got {tuple(noises[b].shape)}")
        else:
            noise = _initial_noise(1, n, mel_dim, None if seeds is None else seeds[b], None, device, dtype)
        rows.append(torch.cat([prompt, noise], dim=1)[0])
        cond_rows.append(cond[0])
        n_prompt.append(p)
        n_target.append(n)
    x = nn.utils.rnn.pad_sequence(rows, batch_first=True)          # [B, T, mel], zero pad
    cond = nn.utils.rnn.pad_sequence(cond_rows, batch_first=True)  # [B, T, H]
    T = x.shape[1]
    pos = torch.arange(T, device=device)[None]
    p_len = torch.tensor(n_prompt, device=device)[:, None]
    end = p_len + torch.tensor(n_target, device=device)[:, None]
    valid_c, valid_u = pos < end, pos < end - p_len                 # [B, T] key masks of the two row kinds
    is_target = ((pos >= p_len) & valid_c)[..., None]              # [B, T, 1]: the frames the ODE moves
    to_u = (pos + p_len).clamp(max=T - 1)                           # uncond frame j = cond frame P_b + j
    to_c = (pos - p_len).clamp(min=0)                               # and back
    count = torch.tensor(n_target, device=device, dtype=torch.float32) * mel_dim

    guided = cfg > 0
    if guided:
        both_cond = torch.cat([cond, torch.zeros_like(cond)])
        both_mask = torch.cat([valid_c, valid_u]).float()
    h = 1.0 / n_timesteps
    for i in range(n_timesteps):
        t = torch.full((2 * B if guided else B,), (i + 0.5) * h, device=device, dtype=dtype)
        if guided:
            x_u = torch.where(valid_u[..., None], _gather_frames(x, to_u), 0)
            v = model(torch.cat([x, x_u]), t, both_cond, both_mask)
            v_c, v_u = v[:B], _gather_frames(v[B:], to_c)
            v_cfg = v_c + cfg * (v_c - v_u)
            v_c = (rescale_cfg * v_cfg * _masked_item_std(v_c, is_target, count)
                   / _masked_item_std(v_cfg, is_target, count) + (1 - rescale_cfg) * v_cfg)
        else:
            v_c = model(x, t, cond, valid_c.float())
        # Only target frames move: the prompt stays clean and the padding stays zero.
        x = torch.where(is_target, x + h * v_c, x)
    return [x[b, p:p + n] for b, (p, n) in enumerate(zip(n_prompt, n_target))]
