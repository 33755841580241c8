"""REPA representation-alignment loss."""


def repa_loss(zs_tilde, zs, eps=1e-12):
    """Negative cosine similarity of projected SiT tokens and encoder tokens, mean over tokens, samples, encoders.

    One batched expression per encoder; the cosine is formed from the dot product and the norms, so no normalized
    copies of the (B, T, D) features are materialized.
    """
    losses = []
    for z_tilde, z in zip(zs_tilde, zs, strict=True):
        norms = z_tilde.norm(dim=-1).clamp_min(eps) * z.norm(dim=-1).clamp_min(eps)
        losses.append(-((z_tilde * z).sum(dim=-1) / norms).mean())
    return sum(losses) / len(losses)
