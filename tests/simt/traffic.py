"""Global memory traffic of each CUDA kernel under the emulator, against its minimal-traffic model.

    python -m tests.simt.traffic        # from the repository root

The model is every input read once and every output written once (attention: Q, K, V -> O and the fp32
log-sum-exp; its backward: dO, Q, K, V -> dQ, dK, dV; pyramid pooling: input -> output and back). The
emulator counts the bytes each launch's loads and stores touch, before any cache: a ratio above 1 is
re-reading (or workspace traffic) that a GPU's L2 may or may not absorb.
"""

import torch

from . import Emulator


def _channel_first(batch, rows, dim, dtype):
    return torch.randn(batch, dim, rows, dtype=dtype).transpose(1, 2)


def _line(title, launches, model):
    total = sum(launch.read_bytes + launch.written_bytes for launch in launches)
    kernels = ", ".join(f"{launch.kernel} grid {launch.grid[:2]}" for launch in launches)
    print(f"{title}: {total / 1e6:.2f} MB, model {model / 1e6:.2f} MB, {total / model:.2f}x  [{kernels}]")


def attention(emulator, batch, queries, keys, key_dim, value_dim, dtype):
    q = _channel_first(batch, queries, key_dim, dtype)
    k = _channel_first(batch, keys, key_dim, dtype)
    v = _channel_first(batch, keys, value_dim, dtype)
    size = q.element_size()
    start = len(emulator.launches)
    out, _ = emulator.attention_forward(q, k, v, key_dim ** -0.5)
    forward = emulator.launches[start:]
    start = len(emulator.launches)
    emulator.attention_backward(torch.randn_like(out), q, k, v, key_dim ** -0.5)
    backward = emulator.launches[start:]
    inputs = batch * (queries * key_dim + keys * key_dim + keys * value_dim)
    title = f"attention {str(dtype)[6:]} B={batch} N={queries} S={keys} Dk={key_dim} Dv={value_dim}"
    _line(f"{title} forward", forward, size * (inputs + batch * queries * value_dim) + 4 * batch * queries)
    # Backward reads dO, Q, K, V and writes dQ, dK, dV (the same sizes as Q, K, V).
    _line(f"{title} backward", backward, size * (2 * inputs + batch * queries * value_dim))


def pyramid(emulator, shape, scales, channels_last):
    x = torch.randn(shape)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    start = len(emulator.launches)
    out = emulator.pyramid_forward(x, scales)
    emulator.pyramid_backward(torch.randn_like(out), scales, *shape[2:])
    model = x.element_size() * (x.numel() + out.numel())
    layout = "nhwc" if channels_last else "nchw"
    for launch in emulator.launches[start:]:
        _line(f"pyramid {layout} {tuple(shape)} scales {scales} {launch.kernel}", [launch], model)


if __name__ == "__main__":
    emulator = Emulator()
    attention(emulator, 2, 300, 110, 256, 256, torch.float32)
    attention(emulator, 2, 300, 110, 256, 256, torch.float16)
    attention(emulator, 1, 1200, 50, 64, 64, torch.bfloat16)
    for channels_last in (False, True):
        pyramid(emulator, (1, 64, 97, 97), (1, 3, 6, 8), channels_last)
