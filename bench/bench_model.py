"""Whole ANN segmentor: the pytest-benchmark matrix, and same-run A/B comparisons of model-level speed.

Matrix (``pytest bench/bench_model.py --benchmark-only``):
"train_step": forward + loss + backward + SGD step (mmseg's optimizer settings), train mode, B=2
512x1024 crops; peak_mem_total_mb is the absolute torch.cuda.max_memory_allocated of a step, the number
mmseg publishes (6.0 GB per GPU at 2 images per GPU, SyncBN over 4 V100s; here BatchNorm on one GPU).
"infer": model.predict + argmax on one 1024x2048 image (mmseg's tools/benchmark.py: batch 1, no_grad,
post-processing included); items_per_s is images/s, published 3.71 fps on a V100 in fp32.
CPU: ann_r18_d8 at 128x256 so a CPU run stays short (a smoke number, not comparable to mmseg's).
Providers are the annkernels backends, plus two inference peers: "fast" (models.optimize_for_inference:
folded BatchNorm, channels_last, inductor with freezing) and "onnxruntime" (models.export_onnx run by ONNX
Runtime's CPU provider).

A/B comparisons (``python -m bench.bench_model {eval,train,memory,profile}``): on a shared machine two
separately timed cases differ by the load of the moment, so every configuration is built in one process and
the rounds are interleaved: round r times each configuration once, in an order rotated by r. A ratio is
taken inside each round (baseline time / configuration time); we report its median and its range over the
rounds, next to each configuration's median time and 20th/80th percentiles. The baseline is always the
unoptimised model on the reference backend, which computes as mmsegmentation does.

    python -m bench.bench_model eval --model ann_r50_d8 --size 512 512 --rounds 9
    python -m bench.bench_model train --model ann_r50_d8 --batch 2 --size 256 512 --rounds 7
    python -m bench.bench_model memory --model ann_r50_d8 --batch 2 --size 512 1024
    python -m bench.bench_model profile --mode eval --model ann_r50_d8 --size 512 512
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from typing import Callable

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a file: make `bench` and `models` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.utils import (  # noqa: E402
    REFERENCE,
    OpBench,
    Provider,
    Shape,
    Unsupported,
    Workload,
    environment,
    peak_memory_bytes,
    quantiles,
    registered_backends,
)

NUM_CLASSES = 19  # Cityscapes
IGNORE_INDEX = 255

# mmseg configs/ann/README.md, Cityscapes R-50-D8 512x1024 (docs/performance.md section 2).
PUBLISHED = {"train_mem_gb": 6.0, "infer_fps": 3.71, "infer_gpu": "V100", "source": "mmsegmentation configs/ann"}

SHAPES = (
    Shape("r50_train", dict(model="ann_r50_d8", B=2, H=512, W=1024), passes=("train_step",), cpu=False),
    Shape("r50_infer", dict(model="ann_r50_d8", B=1, H=1024, W=2048), passes=("infer",), cpu=False),
    Shape("r18_train_cpu", dict(model="ann_r18_d8", B=1, H=128, W=256), passes=("train_step",), gpu=False),
    Shape("r18_infer_cpu", dict(model="ann_r18_d8", B=1, H=128, W=256), passes=("infer",), gpu=False),
)


def _models():
    try:
        import models
    except ImportError as exc:
        raise Unsupported(f"models package not importable: {exc}") from None
    return models


def _build(name: str, backend: str | None, device: torch.device, dtype: torch.dtype = torch.float32):
    return _models().build_segmentor(name, NUM_CLASSES, backend=backend).to(device=device, dtype=dtype)


def _batch(batch: int, height: int, width: int, device: torch.device, dtype: torch.dtype = torch.float32):
    images = torch.randn(batch, 3, height, width, dtype=dtype, device=device)
    target = torch.randint(0, NUM_CLASSES, (batch, height, width), device=device)
    target[:, :8] = IGNORE_INDEX  # a band of unlabelled pixels, as Cityscapes has
    return images, target


def training_step(model, images: torch.Tensor, target: torch.Tensor) -> Callable[[], None]:
    """One SGD step of ``model`` (switched to train mode) on a fixed batch, as the training loop runs it."""
    models = _models()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    model.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss, _ = models.segmentation_loss(model(images), target, align_corners=model.align_corners)
        loss.backward()
        optimizer.step()

    return step


def onnxruntime_logits(model, height: int, width: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model`` exported to ONNX at height x width and run by ONNX Runtime's CPU provider with torch's thread
    count: images [B, 3, H, W] -> logits [B, K, h, w] as a torch tensor."""
    try:
        import onnxruntime
    except ImportError:
        raise Unsupported("onnxruntime is not installed (pip install -e '.[onnx]')") from None
    from models.export import INPUT_NAME, export_onnx

    with tempfile.TemporaryDirectory() as folder:
        path = export_onnx(model, os.path.join(folder, "model.onnx"), height, width)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def run(images: torch.Tensor) -> torch.Tensor:
        (logits,) = session.run(None, {INPUT_NAME: images.numpy()})
        return torch.from_numpy(logits)

    return run


# ----------------------------------------------------------------------------------------------------------------
# pytest-benchmark matrix


def _provider(backend: str) -> Provider:
    def make(shape: Shape, dtype: torch.dtype, device: torch.device) -> Workload:
        d = shape.dims
        model = _build(d["model"], backend, device, dtype)
        images, target = _batch(d["B"], d["H"], d["W"], device, dtype)

        def infer_factory():
            model.eval()

            def infer():
                with torch.no_grad():
                    model.predict(images).argmax(1)

            return infer

        return Workload({"train_step": lambda: training_step(model, images, target), "infer": infer_factory},
                        items=d["B"])

    return Provider(backend, make)


def _inference_peer(name: str, logits_of: Callable) -> Provider:
    """A provider for the "infer" pass only: ``logits_of(model, images)`` turns the eval model built on the
    default backend into a callable images -> 1/8-resolution logits."""

    def make(shape: Shape, dtype: torch.dtype, device: torch.device) -> Workload:
        if "infer" not in shape.passes:
            raise Unsupported(f"{name} is an inference path")
        if device.type != "cpu" or dtype != torch.float32:
            raise Unsupported(f"{name} is timed on CPU in float32")
        d = shape.dims
        images, _ = _batch(d["B"], d["H"], d["W"], device, dtype)
        logits = logits_of(_build(d["model"], None, device, dtype).eval(), images)

        def infer():
            full = F.interpolate(logits(images), size=images.shape[-2:], mode="bilinear", align_corners=False)
            full.argmax(1)

        return Workload({"infer": lambda: infer}, items=d["B"])

    return Provider(name, make, kind="peer")


def providers(device: str) -> list:
    backends = [_provider(name) for name in registered_backends(device)]
    if device != "cpu":
        return backends
    return backends + [
        _inference_peer("fast", lambda model, images: _models().optimize_for_inference(model, log=None)),
        _inference_peer("onnxruntime", lambda model, images: onnxruntime_logits(model, *images.shape[-2:])),
    ]


BENCH = OpBench("model", SHAPES, dtypes=("float32",), providers=providers)


def test_model(bench_case):
    bench_case()


# ----------------------------------------------------------------------------------------------------------------
# Interleaved A/B comparisons


def interleaved(configs: dict[str, Callable[[], object]], rounds: int, baseline: str) -> dict:
    """Times each configuration once per round, in an order rotated by the round; per-round ratios to
    ``baseline``. The first call of each (compiles, one-time set-up) is timed apart as ``first_call_s``.

    Wall time and process CPU time are both kept. On a loaded machine the wall time includes the time the OS
    gave to other jobs; the CPU time does not, and with one thread it is the work a call did (with more
    threads it also counts their waits at barriers)."""
    names = list(configs)
    first = {}
    for name in names:
        start = time.perf_counter()
        configs[name]()
        first[name] = time.perf_counter() - start
        print(f"  warm-up {name}: {first[name]:.1f} s", flush=True)
    wall, cpu = defaultdict(list), defaultdict(list)
    for index in range(rounds):
        for name in names[index % len(names):] + names[:index % len(names)]:
            start, start_cpu = time.perf_counter(), time.process_time()
            configs[name]()
            wall[name].append((time.perf_counter() - start) * 1e3)
            cpu[name].append((time.process_time() - start_cpu) * 1e3)
        print(f"  round {index + 1}/{rounds} wall (cpu) ms: "
              + ", ".join(f"{n} {wall[n][-1]:.0f} ({cpu[n][-1]:.0f})" for n in names), flush=True)
    rows = {}
    for name in names:
        rows[name] = dict(first_call_s=first[name], wall_ms=wall[name], cpu_ms=cpu[name])
        for clock, times in (("wall", wall), ("cpu", cpu)):
            ratios = [b / t for b, t in zip(times[baseline], times[name], strict=True)]
            rows[name][clock] = dict(quantiles(times[name]), speedup_median=statistics.median(ratios),
                                     speedup_min=min(ratios), speedup_max=max(ratios))
    return rows


def _eval_configs(args, device) -> dict:
    models = _models()
    reference = _build(args.model, REFERENCE, device).eval()
    ours = _build(args.model, None, device).eval()
    ours.load_state_dict(reference.state_dict())
    images = torch.randn(args.batch, 3, *args.size, device=device)

    def eager(model):
        def run():
            with torch.no_grad():
                return model(images)
        return run

    fast = models.optimize_for_inference(ours)
    folded_cl = models.optimize_for_inference(ours, compile=False)
    folded = models.optimize_for_inference(ours, channels_last=False, compile=False)
    configs = {"reference": eager(reference), "ours_eager": eager(ours), "ours_folded": lambda: folded(images),
               "ours_folded_cl": lambda: folded_cl(images), "ours_fast": lambda: fast(images)}
    configs = _chosen(configs, args.configs)
    if not args.no_onnx:
        try:
            ort = onnxruntime_logits(ours, *args.size)
            configs["onnxruntime"] = lambda: ort(images)
        except Unsupported as exc:
            print(f"  onnxruntime left out: {exc}")
    expected = configs["reference"]()
    scale = expected.abs().max().item()
    for name, run in configs.items():
        error = (run() - expected).abs().max().item()
        print(f"  {name}: max |logits - reference| = {error:.2e} ({error / scale:.1e} of the largest logit)",
              flush=True)
    return configs


def _train_configs(args, device) -> dict:
    images, target = _batch(args.batch, *args.size, device)
    state = _build(args.model, REFERENCE, device).state_dict()
    # name: (backend, channels_last, compile)
    variants = {"reference": (REFERENCE, False, False), "ours_eager": (None, False, False),
                "ours_cl": (None, True, False), "ours_compile": (None, False, True),
                "ours_cl_compile": (None, True, True)}
    variants = _chosen(variants, args.configs)
    configs = {}
    for name, (backend, channels_last, compiled) in variants.items():
        model = _build(args.model, backend, device)
        model.load_state_dict(state)
        batch = images
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            batch = images.contiguous(memory_format=torch.channels_last)
        if compiled:
            model.compile()  # what train.py's --compile does
        configs[name] = training_step(model, batch, target)
    return configs


def _chosen(configs: dict, names: list | None) -> dict:
    """The baseline plus the configurations named (all when ``names`` is empty)."""
    if not names:
        return configs
    unknown = set(names) - set(configs)
    if unknown:
        raise SystemExit(f"unknown configurations {sorted(unknown)}; choose from {sorted(configs)}")
    return {name: run for name, run in configs.items() if name == "reference" or name in names}


def _memory(args, device) -> dict:
    rows = {}
    images, target = _batch(args.batch, *args.size, device)
    for name, backend in (("reference", REFERENCE), ("ours", None)):
        step = training_step(_build(args.model, backend, device), images, target)
        # The momentum buffers appear in the first step's optimizer.step(), after the backward has freed the
        # activations, so they do not move the peak: no warm-up step.
        delta, total = peak_memory_bytes(step, device)
        rows[name] = {"peak_step_mb": delta / 2**20, "peak_total_mb": None if total is None else total / 2**20}
        print(f"  {name}: peak memory of a step {delta / 2**20:.0f} MiB above the model, optimizer and batch",
              flush=True)
    rows["ours"]["ratio_to_reference"] = rows["ours"]["peak_step_mb"] / rows["reference"]["peak_step_mb"]
    return rows


LAYER_TYPES = (
    ("convolution", ("conv", "mkldnn")),
    ("batch_norm", ("batch_norm",)),
    ("loss", ("nll_loss", "log_softmax", "cross_entropy")),
    ("attention", ("short_attention", "bmm", "matmul", "softmax")),
    ("pyramid_pool", ("pyramid_pool", "adaptive_avg_pool")),
    ("relu_add_dropout", ("relu", "add", "dropout", "threshold", "mul")),
    ("copy_cat_resize", ("copy", "cat", "clone", "contiguous", "upsample", "to_copy")),
)


def _layer_type(op_name: str) -> str:
    for layer_type, keys in LAYER_TYPES:
        if any(key in op_name for key in keys):
            return layer_type
    return "other"


def _conv_flops(model, run) -> float:
    """FLOPs (2 per multiply-add) of every Conv2d in one call, counted from the shapes its outputs take."""
    total = [0.0]

    def count(module, inputs, output):
        kernel = module.weight[0].numel()  # Cin/groups * kh * kw
        total[0] += 2.0 * kernel * output.numel()

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return total[0]


def _matmul_peak_flops(size: int = 2048, rounds: int = 5) -> float:
    """The CPU's measured fp32 GEMM rate (best of ``rounds``), the practical peak for convolutions."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = min(_seconds(lambda: torch.mm(a, b)) for _ in range(rounds))
    return 2.0 * size**3 / best


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _profile(args, device) -> dict:
    """Where an eval forward or a training step of the eager model spend their time, split by layer type, on
    each backend, and the convolutions' FLOP rate against the measured GEMM peak."""
    from torch.profiler import ProfilerActivity, profile

    result = {"gemm_peak_gflops": _matmul_peak_flops() / 1e9}
    print(f"  measured fp32 GEMM peak: {result['gemm_peak_gflops']:.1f} GFLOP/s", flush=True)
    images, target = _batch(args.batch, *args.size, device)
    mode = args.mode
    for backend in (REFERENCE, None):
        name = f"{mode}-{backend or 'default'}"
        model = _build(args.model, backend, device)
        if mode == "eval":
            model.eval()

            def run():
                with torch.no_grad():
                    model(images)
        else:
            run = training_step(model, images, target)
        run()
        flops = _conv_flops(model, run) * (3 if mode == "train" else 1)  # backward: grad input + grad weight
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            wall = _seconds(run)
        split = defaultdict(float)
        for event in prof.key_averages():
            if event.key.startswith(("aten::", "annkernels::")) and event.self_cpu_time_total > 0:
                split[_layer_type(event.key)] += event.self_cpu_time_total / 1e3
        profiled = sum(split.values())
        conv_ms = split["convolution"]
        result[name] = {"wall_ms": wall * 1e3, "conv_gflop": flops / 1e9,
                        "conv_gflops_rate": flops / 1e9 / (conv_ms / 1e3) if conv_ms else None,
                        "split_ms": dict(sorted(split.items(), key=lambda item: -item[1]))}
        print(f"  {name}: {wall * 1e3:.0f} ms (profiled); conv {flops / 1e9:.1f} GFLOP in {conv_ms:.0f} ms = "
              f"{result[name]['conv_gflops_rate'] or 0:.1f} GFLOP/s", flush=True)
        for layer_type, ms in result[name]["split_ms"].items():
            print(f"    {layer_type:<18} {ms:9.1f} ms  {100 * ms / profiled:5.1f}%")
    return result


def _print_rows(rows: dict, baseline: str) -> None:
    for clock in ("wall", "cpu"):
        print(f"\n{clock} time   {'median ms':>10} {'p20':>9} {'p80':>9} {'first s':>8}  speedup vs {baseline} "
              "(median [min, max] of the per-round ratios)")
        for name, row in rows.items():
            stats = row[clock]
            print(f"{name:<18} {stats['median_ms']:10.1f} {stats['p20_ms']:9.1f} {stats['p80_ms']:9.1f} "
                  f"{row['first_call_s']:8.1f}  {stats['speedup_median']:.3f} [{stats['speedup_min']:.3f}, "
                  f"{stats['speedup_max']:.3f}]")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[2],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("what", choices=("eval", "train", "memory", "profile"))
    parser.add_argument("--model", default="ann_r50_d8")
    parser.add_argument("--batch", type=int, default=None, help="images per call (eval 1, otherwise 2)")
    parser.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="eval 512 512, train 256 512, memory 512 1024, profile 512 512")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--configs", nargs="*", help="a subset to time (the reference always runs): eval "
                        "ours_eager ours_folded ours_folded_cl ours_fast; train ours_eager ours_cl ours_compile ours_cl_compile")
    parser.add_argument("--mode", choices=("eval", "train"), default="eval", help="profile: what to profile")
    parser.add_argument("--no-onnx", action="store_true", help="eval: leave ONNX Runtime out")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    default_size = {"eval": (512, 512), "train": (256, 512), "memory": (512, 1024), "profile": (512, 512)}
    args.size = tuple(args.size or default_size[args.what])
    args.batch = args.batch or (1 if args.what in ("eval", "profile") else 2)
    device = torch.device("cpu")
    env = environment(device)
    print(f"{args.what} {args.model} [{args.batch}, 3, {args.size[0]}, {args.size[1]}] on {env['device']}, "
          f"{env['torch_threads']} threads, torch {env['torch']}, load {env['load_avg_1m']}", flush=True)
    torch.manual_seed(0)
    if args.what in ("eval", "train"):
        configs = (_eval_configs if args.what == "eval" else _train_configs)(args, device)
        result = interleaved(configs, args.rounds, baseline="reference")
        _print_rows(result, "reference")
    elif args.what == "memory":
        result = _memory(args, device)
    else:
        result = _profile(args, device)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"env": env, "args": vars(args), "result": result}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
