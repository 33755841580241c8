"""ODE (Euler / Heun) and SDE (Euler-Maruyama) samplers for velocity-predicting SiT models.

Time runs from 1 (noise) to 0 (data). The state is kept in float64; the model runs in the latents' dtype.
Classifier-free guidance applies only while guidance_low <= t <= guidance_high; the null label is
model.num_classes.
"""
import torch

from models.interpolant import interpolant


def score_from_velocity(v, x_t, t, path_type="linear"):
    """Score of p_t at x_t implied by the velocity v, for times t (N,)."""
    t = t.view(-1, *[1] * (x_t.ndim - 1))
    alpha_t, sigma_t, d_alpha_t, d_sigma_t = interpolant(t, path_type)
    reverse_alpha_ratio = alpha_t / d_alpha_t
    var = sigma_t ** 2 - reverse_alpha_ratio * d_sigma_t * sigma_t
    return (reverse_alpha_ratio * v - x_t) / var


def guided(t, cfg_scale, guidance_low, guidance_high):
    """Whether classifier-free guidance applies at time t."""
    return cfg_scale > 1.0 and guidance_low <= t <= guidance_high


def model_inputs(model, x, y, t, use_cfg):
    """Batch for one network call: x and y, doubled with null labels under guidance; times as (N,) float64."""
    if use_cfg:
        x = torch.cat([x, x], dim=0)
        y = torch.cat([y, torch.full_like(y, model.num_classes)], dim=0)
    return x, y, torch.full((x.shape[0],), float(t), dtype=torch.float64, device=x.device)


def apply_cfg(out, cfg_scale, use_cfg):
    """Combine conditional and unconditional halves: uncond + scale * (cond - uncond)."""
    if not use_cfg:
        return out
    cond, uncond = out.chunk(2)
    return uncond + cfg_scale * (cond - uncond)


def velocity(model, x, y, t, dtype, cfg_scale, use_cfg):
    """Guided velocity (float64) at state x (float64) and time t."""
    x_in, y_in, t_in = model_inputs(model, x, y, t, use_cfg)
    v = model.inference(x_in.to(dtype), t_in.to(dtype), y=y_in).to(torch.float64)
    return apply_cfg(v, cfg_scale, use_cfg)


def euler_sampler(model, latents, y, num_steps=20, heun=False, cfg_scale=1.0, guidance_low=0.0,
                  guidance_high=1.0, path_type="linear"):
    """Probability-flow ODE from t=1 to 0 in num_steps uniform steps (Heun's correction except on the last).

    path_type is unused: the velocity ODE is the same for every path (kept for a common signature).
    """
    dtype = latents.dtype
    t_steps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    x_next = latents.to(torch.float64)
    with torch.no_grad():
        for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
            x_cur = x_next
            # both Heun stages take t_cur's guidance decision, not t_next's: the reference samples were made so
            use_cfg = guided(t_cur, cfg_scale, guidance_low, guidance_high)
            d_cur = velocity(model, x_cur, y, t_cur, dtype, cfg_scale, use_cfg)
            x_next = x_cur + (t_next - t_cur) * d_cur
            if heun and i < num_steps - 1:
                d_prime = velocity(model, x_next, y, t_next, dtype, cfg_scale, use_cfg)
                x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def sde_drift(model, x, y, t, dtype, cfg_scale, use_cfg, path_type):
    """Reverse-SDE drift v - 0.5 * w(t) * score with diffusion w(t) = 2t, guided after the score conversion."""
    x_in, y_in, t_in = model_inputs(model, x, y, t, use_cfg)
    v = model.inference(x_in.to(dtype), t_in.to(dtype), y=y_in).to(torch.float64)
    drift = v - 0.5 * (2 * t) * score_from_velocity(v, x_in, t_in, path_type)
    return apply_cfg(drift, cfg_scale, use_cfg)


def euler_maruyama_sampler(model, latents, y, num_steps=20, heun=False, cfg_scale=1.0, guidance_low=0.0,
                           guidance_high=1.0, path_type="linear"):
    """Reverse SDE from t=1 to 0.04 in num_steps-1 noisy steps, then one deterministic step to 0.

    heun is unused (kept for a common signature). Draws one torch.randn_like(state) per noisy step.
    """
    dtype = latents.dtype
    t_steps = torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64)
    t_steps = torch.cat([t_steps, torch.zeros(1, dtype=torch.float64)])
    x_next = latents.to(torch.float64)
    with torch.no_grad():
        for t_cur, t_next in zip(t_steps[:-2], t_steps[1:-1]):
            dt = t_next - t_cur
            x_cur = x_next
            use_cfg = guided(t_cur, cfg_scale, guidance_low, guidance_high)
            deps = torch.randn_like(x_cur) * torch.sqrt(torch.abs(dt))
            d_cur = sde_drift(model, x_cur, y, t_cur, dtype, cfg_scale, use_cfg, path_type)
            x_next = x_cur + d_cur * dt + torch.sqrt(2 * t_cur) * deps
        # last step: the mean of the transition, without noise
        t_cur, t_next = t_steps[-2], t_steps[-1]
        use_cfg = guided(t_cur, cfg_scale, guidance_low, guidance_high)
        d_cur = sde_drift(model, x_next, y, t_cur, dtype, cfg_scale, use_cfg, path_type)
        return x_next + (t_next - t_cur) * d_cur
