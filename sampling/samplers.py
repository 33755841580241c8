"""ODE (Euler / Heun) and SDE (Euler-Maruyama) samplers for velocity-predicting SiT models.

Time runs from 1 (noise) to 0 (data). The state is kept in float64; the model runs in the latents' dtype.
Classifier-free guidance applies only while guidance_low <= t <= guidance_high; the null label is
model.num_classes. Under guidance the conditional and unconditional halves go through one batched call.

The time schedule, the guidance decisions and the SDE's per-step numbers are made once before the loop (no host
reads of tensor values inside it); the doubled labels and the model's input buffers are made once. The samples are
bitwise those of a plain per-step loop that builds the batch, converts the time and decides guidance inside each
step (tests/test_samplers.py checks the Euler ODE and the SDE, with and without guidance, on the linear and
cosine paths).
"""
import torch

from models.interpolant import interpolant


def compile_inference(model):
    """Compile the model's inference, the samplers' only call into it (torch.compile, one graph per batch shape)."""
    model.inference = torch.compile(model.inference, dynamic=False)
    return model


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


class GuidedVelocity:
    """The model's velocity at a state, with guidance: fixed labels, one input buffer per batch size, float64 out."""

    def __init__(self, model, y, dtype, cfg_scale):
        self.model, self.dtype, self.cfg_scale = model, dtype, cfg_scale
        self.n = y.shape[0]
        self.labels = {False: y, True: torch.cat([y, torch.full_like(y, model.num_classes)])}
        self.inputs = {}

    def model_input(self, x, use_cfg):
        """x in the model's dtype, written twice under guidance, into a buffer kept between steps."""
        size = 2 * self.n if use_cfg else self.n
        if size not in self.inputs:
            self.inputs[size] = torch.empty((size, *x.shape[1:]), dtype=self.dtype, device=x.device)
        buffer = self.inputs[size]
        buffer[:self.n].copy_(x)
        if use_cfg:
            buffer[self.n:].copy_(x)
        return buffer

    def raw(self, x, t, use_cfg):
        """Unguided velocity (float64) of both halves under guidance, and the float64 model input it saw."""
        x_in = self.model_input(x, use_cfg)
        t_in = torch.full((x_in.shape[0],), t, dtype=self.dtype, device=x.device)
        return self.model.inference(x_in, t_in, y=self.labels[use_cfg]).to(torch.float64)

    def combine(self, out, use_cfg):
        """Conditional and unconditional halves into uncond + scale * (cond - uncond)."""
        if not use_cfg:
            return out
        cond, uncond = out.chunk(2)
        return uncond + self.cfg_scale * (cond - uncond)

    def __call__(self, x, t, use_cfg):
        """Guided velocity (float64) at state x (float64) and time t (a number)."""
        return self.combine(self.raw(x, t, use_cfg), use_cfg)


def euler_sampler(model, latents, y, num_steps=20, heun=False, cfg_scale=1.0, guidance_low=0.0,
                  guidance_high=1.0, path_type="linear"):
    """Probability-flow ODE from t=1 to 0 in num_steps uniform steps (Heun's correction except on the last).

    path_type is unused: the velocity ODE is the same for every path (kept for a common signature).
    """
    t_steps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64).tolist()
    velocity = GuidedVelocity(model, y, latents.dtype, cfg_scale)
    x_next = latents.to(torch.float64)
    with torch.no_grad():
        for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
            x_cur, dt = x_next, t_next - t_cur
            # both Heun stages take t_cur's guidance decision, not t_next's: the reference samples were made so
            use_cfg = guided(t_cur, cfg_scale, guidance_low, guidance_high)
            d_cur = velocity(x_cur, t_cur, use_cfg)
            x_next = x_cur + dt * d_cur
            if heun and i < num_steps - 1:
                d_prime = velocity(x_next, t_next, use_cfg)
                x_next = x_cur + dt * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def sde_drift(velocity, x, t, t_in, use_cfg, path_type):
    """Reverse-SDE drift v - 0.5 * w(t) * score with diffusion w(t) = 2t, guided after the score conversion; t is a
    number, t_in the same time as a float64 tensor of the model's batch size."""
    v = velocity.raw(x, t, use_cfg)
    x_in = torch.cat([x, x]) if use_cfg else x
    drift = v - 0.5 * (2 * t) * score_from_velocity(v, x_in, t_in, path_type)
    return velocity.combine(drift, use_cfg)


def euler_maruyama_sampler(model, latents, y, num_steps=20, heun=False, cfg_scale=1.0, guidance_low=0.0,
                           guidance_high=1.0, path_type="linear"):
    """Reverse SDE from t=1 to 0.04 in num_steps-1 noisy steps, then one deterministic step to 0.

    heun is unused (kept for a common signature). Draws one torch.randn_like(state) per noisy step.
    The per-step numbers are made before the loop with the published sampler's own tensor operations (torch's
    sqrt and pow can differ from Python's in the last bit), so the samples are bitwise the same.
    """
    t_steps = torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64)
    t_steps = torch.cat([t_steps, torch.zeros(1, dtype=torch.float64)])
    velocity = GuidedVelocity(model, y, latents.dtype, cfg_scale)
    steps = []
    for t, t_cur, t_next in zip(t_steps.tolist(), t_steps[:-1], t_steps[1:]):
        use_cfg = guided(t, cfg_scale, guidance_low, guidance_high)
        t_in = torch.full(((2 if use_cfg else 1) * y.shape[0],), t, dtype=torch.float64, device=latents.device)
        steps.append((t, t_next - t_cur, torch.sqrt(torch.abs(t_next - t_cur)), torch.sqrt(2 * t_cur), t_in,
                       use_cfg))
    x_next = latents.to(torch.float64)
    with torch.no_grad():
        for t_cur, dt, noise_scale, diffusion, t_in, use_cfg in steps[:-1]:
            x_cur = x_next
            deps = torch.randn_like(x_cur) * noise_scale
            d_cur = sde_drift(velocity, x_cur, t_cur, t_in, use_cfg, path_type)
            x_next = x_cur + d_cur * dt + diffusion * deps
        # last step: the mean of the transition, without noise
        t_cur, dt, _, _, t_in, use_cfg = steps[-1]
        d_cur = sde_drift(velocity, x_next, t_cur, t_in, use_cfg, path_type)
        return x_next + dt * d_cur
