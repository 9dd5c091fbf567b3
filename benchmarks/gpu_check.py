"""
The GPU check: in one command, what the CPU cannot show about the GPU path, measured on random-
weight models of real shape (benchmarks/configs/: no hub access needed), written section by section
to one JSON file. It runs from a plain copy of the repository (no install: it puts the repository
root on sys.path itself).

    python benchmarks/gpu_check.py --out gpu_check.json --budget-s 450   # one H100 / H200
    python benchmarks/gpu_check.py --cpu-smoke --out smoke.json             # any CPU: tiny shapes

Why it is built this way. A GPU lease is minutes long, so nothing may lose what was measured:
every section runs in its own try (its error is recorded in one line plus a traceback tail and the
next section runs), the JSON is rewritten atomically (a temporary file, then os.replace) after each
section, so a run killed at any moment leaves every finished section on disk, and a section whose
estimated cost (SECTIONS: guesses, never yet measured on a GPU) no longer fits --budget-s is
recorded as "skipped: budget" instead of started. The correctness rows come first, then the
command lines and the pipeline (the only learning check a lease can run), the timings last.

Sections (on --cpu-smoke the same code at tiny shapes; "-" where a figure needs CUDA):
  environment      device, torch, cuDNN, the package's path, the peaks (from the device name, roofline.py)
  logits_parity    one random 1.5B model built on the CPU in float32, moved to the device in float32
                   and bf16: max |logits - CPU logits| (one model: CPU and CUDA generators differ)
  attention        the SDPA ops the profiler saw in prefill and, apart, in decode (generate.generate_many,
                   eager), and generation under sdpa_kernel([FLASH, EFFICIENT, CUDNN]): any fused
                   kernel is acceptable in either phase, cuDNN included (torch 2.11 prefers it on
                   sm90); only the math fallback is not
  graph_vs_eager   greedy tokens of the CUDA-graph decode == eager decode at the same widths (the
                   graph's buckets); eager at exact widths is compared by per-token log-probs
                   (bf16 near-ties may flip a token: |diff| <= LOGPROB_TOLERANCE on the common prefix)
  train_sft_cli,   the real command lines, as subprocesses with timeouts, on a random-weight folder of
  train_rl_cli     the 1.5B shape cut to CLI_LAYERS blocks + data/tiny-base's tokenizer, LoRA r16
  pipeline_smoke   python pipeline.py's smoke run on CUDA: SFT and GRPO accuracy beside CPU_PIPELINE
  decode_1.5B/7B   generate.generate_many tokens/s at batch 1 and 64, graph and eager, the decode loop
                   alone timed with CUDA events (no capture, no first step at a width, no prefill),
                   and the HBM share: roofline.decode_step_bytes / time against the device's peak;
                   1.5B also with float32 master weights under bf16 autocast (decode reads bf16 copies)
  capture_cost     seconds per bucket to capture its graph, in two successive generate_many calls
                   (graphs live for one call): what keeping them across calls would save
  grpo_1.5B/7B     one GRPO step (full fine-tuning, bf16; LoRA r32 on 7B): peak memory against the
                   memory plan, training tokens/s, MFU from roofline.training_flops

cuDNN attention builds an execution plan per new shape. Eager decode attends to one more column
each step, so eager decode is timed at the graphs' bucketed widths (generate_many's widths="bucket":
one plan per bucket). TORCH_CUDNN_SDPA_AVOID_RECOMPILE cannot help: torch applies it only without
an attention bias and with BSHD-contiguous q, k, v (aten/src/ATen/native/cudnn/MHA.cpp), and a
decode step passes a mask.

Nothing here saves a checkpoint in process: the training loop saves at its last step whatever
save_every says, so grpo() replaces checkpoint.save_checkpoint by a no-op. The command lines, which
cannot be patched, train LoRA adapters: their checkpoint is a few MB.
"""
import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]  # no install needed: the package and roofline.py from this copy

import torch  # noqa: E402

import roofline  # noqa: E402
from nanocausal import checkpoint, cli, generate, memory_plan  # noqa: E402
from nanocausal.rl import RLConfig, train_rl  # noqa: E402

SMALL, LARGE = "DeepSeek-R1-Distill-Qwen-1.5B", "DeepSeek-R1-Distill-Qwen-7B"
TINY = {"model_type": "qwen2", "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024, "tie_word_embeddings": True}
CLI_LAYERS = 4
LOGPROB_TOLERANCE = 0.1  # nats: a bf16 forward's logits differ by ~1e-2 between two attention widths
PIPELINE = ["--sft-steps", "60", "--grpo-steps", "10", "--test-problems", "50"]
# The same smoke command on the CPU (2 cores, torch 2.13, 2026-12-07): the figures a GPU run is compared with.
# Overall accuracy on the base test set (50 problems; the constant answer "no path" scores 0.36 there):
# at 60 SFT steps the smoke shows that the trainers run and move the model, not a large gain.
CPU_PIPELINE = {"command": "python pipeline.py " + " ".join(PIPELINE), "seconds": 474,
                "sft_accuracy": {"greedy": 0.36, "sampled": 0.36}, "grpo_accuracy": {"greedy": 0.38, "sampled": 0.36}}


def error_text(e):
    """One line, then the traceback's last lines: enough to fix it, short enough to read in a table."""
    tail = traceback.format_exc().strip().splitlines()[-6:]
    return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", "traceback": tail}


def write_json(path, report):
    """Rewrite the whole report atomically: a reader (or a kill) never sees half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False) as f:
        json.dump(report, f, indent=2)
    os.replace(f.name, path)


def shape_file(name, smoke, scratch, layers=None):
    """A config.json path: the real shape (layers: cut to that many blocks), or the tiny one."""
    config = dict(TINY) if smoke else json.load(open(os.path.join(HERE, "configs", f"{name}.json")))
    if layers and not smoke:
        config["num_hidden_layers"] = layers
    path = os.path.join(scratch, f"{'tiny' if smoke else name}-{layers or 'all'}.json")
    with open(path, "w") as f:
        json.dump(config, f)
    return path


class Timer:
    """Elapsed seconds of a region: CUDA events on the GPU (no host sync inside), a clock on the CPU."""

    def __init__(self, device):
        self.cuda = device.startswith("cuda")
        self.marks = []

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def add(self, start, end, tag):
        self.marks.append((start, end, tag))

    def seconds(self):
        """[(tag, seconds)] of every region recorded."""
        if self.cuda:
            torch.cuda.synchronize()
            return [(tag, start.elapsed_time(end) / 1000) for start, end, tag in self.marks]
        return [(tag, end - start) for start, end, tag in self.marks]


@contextmanager
def timed_steps(device):
    """Time every decode step generate.generate_many runs (the `step` its host loop, generate.serve,
    calls): the decode loop alone, prefill and admission excluded. A step at a width not run before
    (capture, or cuDNN's plan) is tagged ("first", width), the others ("replay", width)."""
    timer, seen, original = Timer(device), set(), generate.serve

    def serve(state, prompts, n, limits, streams, prefill_chunk, check_every, step, *rest, **kwargs):
        def timed(width):
            start = timer.mark()
            result = step(width)
            timer.add(start, timer.mark(), ("replay" if width in seen else "first", width))
            seen.add(width)
            return result
        return original(state, prompts, n, limits, streams, prefill_chunk, check_every, timed, *rest, **kwargs)
    generate.serve = serve
    try:
        yield timer
    finally:
        generate.serve = original


@contextmanager
def patched(module, name, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def prompts_of(batch, length):
    return [[(7 * i + j) % 500 + 1 for j in range(length)] for i in range(batch)]


def greedy(model, prompts, new_tokens, graph, widths=None):
    """Greedy tokens; widths="bucket": eager decode attends at the graphs' bucketed widths too."""
    return generate.generate_many(model, prompts, new_tokens, slots=len(prompts), temperature=0, seed=0,
                                  use_cuda_graph=graph, widths=widths)


# -----------------------------------------------------------------------------
# Sections: each returns a JSON-able dict and a one-line summary for the table


def environment(ctx):
    name = torch.cuda.get_device_name() if ctx.cuda else "cpu"
    ctx.hbm = ctx.args.hbm_tb_s or roofline.from_device_name(roofline.PEAK_HBM_TB_S, name)
    ctx.tflops = ctx.args.peak_tflops or roofline.from_device_name(roofline.PEAK_BF16_TFLOPS, name)
    out = {"device": name, "torch": torch.__version__, "cudnn": torch.backends.cudnn.version() if ctx.cuda else None,
           "package": os.path.dirname(checkpoint.__file__), "peak_hbm_tb_s": ctx.hbm, "peak_bf16_tflops": ctx.tflops, "budget_s": ctx.args.budget_s}
    return out, f"{name}, torch {torch.__version__}, HBM peak {ctx.hbm or '-'} TB/s, bf16 peak {ctx.tflops or '-'} TFLOP/s"


def logits_parity(ctx):
    reference = checkpoint.random_model(ctx.shape(SMALL))  # built once, on the CPU
    ids = torch.randint(0, reference.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    out = {}
    with torch.no_grad():
        expected = reference(ids).float()
        for dtype in (torch.float32, torch.bfloat16):  # Module.to moves the model itself: float32 first
            model = reference.to(ctx.device, dtype)
            model.reset_rope()  # .to(dtype) cast the rotary frequencies too; load_model keeps them float32
            out[str(dtype).removeprefix("torch.")] = (model(ids.to(ctx.device)).float().cpu() - expected).abs().max().item()
            reference = model.to("cpu")
    return out, " / ".join(f"{k} {v:.2e}" for k, v in out.items())


def sdpa_ops(ctx, model, prompts, new_tokens):
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if ctx.cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        greedy(model, prompts, new_tokens, graph=False)
    return {e.key: e.count for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")}


def attention(ctx):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model, prompts = ctx.model(SMALL), [[1] * 40, [2] * 33]  # two lengths: a right-padded, masked GQA prefill
    prefill = sdpa_ops(ctx, model, prompts, 1)  # one new token: the prefill's logits give it, no decode step
    both = sdpa_ops(ctx, model, prompts, 9)
    decode = {k: v - prefill.get(k, 0) for k, v in both.items() if v > prefill.get(k, 0)}
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    try:
        with sdpa_kernel(fused):
            greedy(model, prompts, 8, graph=False)
        fused_only = True
    except RuntimeError as e:
        fused_only = str(e).splitlines()[0]
    out = {"prefill": prefill, "decode": decode, "fused_kernels_only": fused_only}
    return out, f"prefill {', '.join(prefill) or '?'}; decode {', '.join(decode) or '?'}; fused only: {fused_only}"


def graph_vs_eager(ctx):
    model, prompts, new = ctx.model(SMALL), prompts_of(4, 100 if ctx.cuda else 20), 32 if ctx.cuda else 8
    graph = greedy(model, prompts, new, graph=ctx.cuda)
    same_widths = greedy(model, prompts, new, graph=False, widths="bucket")
    exact = greedy(model, prompts, new, graph=False)
    equal = bool(torch.equal(graph.tokens.cpu(), same_widths.tokens.cpu()))
    diffs = []
    for a, b, la, lb in zip(graph.tokens.cpu(), exact.tokens.cpu(), graph.logprobs.cpu(), exact.logprobs.cpu()):
        # up to and including the first different token: a near-tie there has two close log-probs
        prefix = int((a != b).int().argmax()) if bool((a != b).any()) else len(a)
        diffs.append((la[:prefix + 1] - lb[:prefix + 1]).abs().max().item())
    out = {"tokens_equal_at_same_widths": equal, "exact_widths_max_logprob_diff": max(diffs),
           "logprob_tolerance": LOGPROB_TOLERANCE, "exact_widths_within_tolerance": max(diffs) <= LOGPROB_TOLERANCE,
           "graph": ctx.cuda}
    return out, f"tokens equal at the same widths: {equal}; exact widths max |logprob diff| {max(diffs):.3f}"


def capture_cost(ctx):
    if not ctx.cuda:
        return {"note": "no CUDA graphs on the CPU"}, "-"
    model, calls = ctx.model(SMALL), []
    for _ in range(2):  # two successive calls: the second captures again (graphs live for one call)
        with timed_steps(ctx.device) as timer:
            started = time.perf_counter()
            result = greedy(model, prompts_of(16, 400), 256, graph=True)  # widths 401..656: buckets 512 and 656
            wall = time.perf_counter() - started
        times = timer.seconds()
        first = [(tag[1], s) for tag, s in times if tag[0] == "first"]
        replay = [s for tag, s in times if tag[0] == "replay"]
        calls.append({"capture_s_per_bucket": dict(first), "replay_step_s": sum(replay) / len(replay), "call_s": wall,
                      "generate_stats": result.stats})  # the generator's own capture timing (warm-up + capture)
    total = [sum(c["capture_s_per_bucket"].values()) for c in calls]
    return {"calls": calls}, f"capture per call {total[0]:.2f} s then {total[1]:.2f} s ({len(calls[0]['capture_s_per_bucket'])} buckets)"


def cli_model(ctx):
    """A random-weight folder of the 1.5B shape cut to CLI_LAYERS blocks (tiny on --cpu-smoke) with
    data/tiny-base's tokenizer (644 ids: any vocabulary >= that holds them)."""
    folder = os.path.join(ctx.scratch, "cli-model")
    if not os.path.isdir(folder):
        model = checkpoint.random_model(ctx.shape(SMALL, layers=CLI_LAYERS), torch.bfloat16, ctx.device)  # GPU: fast draws
        checkpoint.save_model(model, folder)
        del model
        checkpoint.copy_tokenizer_files(os.path.join(ROOT, "data", "tiny-base"), folder)
    return folder


def run_command(ctx, argv, timeout):
    """A real command line as a subprocess; its last output lines are kept."""
    env = dict(os.environ, PYTHONPATH=ROOT, **({} if ctx.cuda else {"OMP_NUM_THREADS": "1"}))
    ctx.release()  # the trainers check free GPU memory before they start
    started = time.perf_counter()
    timeout = max(5, min(timeout, ctx.left() - 5))
    try:
        done = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        rc, text = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:  # its output may come back as bytes even with text=True
        rc, text = f"timeout {timeout:.0f} s", e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout
    out = {"command": " ".join(argv), "returncode": rc, "seconds": time.perf_counter() - started,
           "tail": (text or "").strip().splitlines()[-8:]}
    if rc != 0:
        raise RuntimeError(f"{argv[0]} exited {rc}: " + " | ".join(out["tail"][-3:]))
    return out


def train_sft_cli(ctx):
    out_dir = os.path.join(ctx.scratch, "sft-cli")
    out = run_command(ctx, ["train_sft.py", "--model", cli_model(ctx), "--out-dir", out_dir, "--steps", "2",
                            "--num-train", "8", "--batch-size", "4", "--tasks", "ATE", "--device", ctx.device,
                            "--dtype", "bfloat16", "--lora-rank", "16", "--eval-every", "0"], 240)
    return out, f"exit 0 in {out['seconds']:.0f} s ({CLI_LAYERS if ctx.cuda else TINY['num_hidden_layers']} layers)"


def train_rl_cli(ctx):
    out_dir = os.path.join(ctx.scratch, "rl-cli")
    out = run_command(ctx, ["train_rl.py", "--algo", "grpo", "--model", cli_model(ctx), "--out-dir", out_dir,
                            "--steps", "2", "--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens",
                            "64" if ctx.cuda else "8", "--tasks", "ATE", "--device", ctx.device, "--dtype", "bfloat16",
                            "--lora-rank", "16", "--eval-every", "0"], 240)
    return out, f"exit 0 in {out['seconds']:.0f} s"


def pipeline_smoke(ctx):
    """The tiny model learning on CUDA; on --cpu-smoke a few steps of it. The accuracies are read
    from results.json (greedy accuracy on the base test set)."""
    out_dir = os.path.join(ctx.scratch, "pipeline")
    flags = PIPELINE if ctx.cuda else ["--sft-steps", "2", "--grpo-steps", "1", "--test-problems", "2",
                                        "--sft-examples", "8", "--batch-size", "4", "--prompts-per-step", "2",
                                        "--group-size", "2", "--jobs", "1",
                                        "--variants", "omitted", "--variant-problems", "2", "--eval-samples", "1"]
    out = run_command(ctx, ["pipeline.py", *flags, "--no-control", "--out", out_dir], 330)
    results = json.load(open(os.path.join(out_dir, "results.json")))
    out["accuracy"] = pipeline_accuracy(results)
    out["cpu_reference"] = CPU_PIPELINE
    acc = out["accuracy"]
    return out, (f"greedy accuracy SFT {acc['SFT']['greedy']}, GRPO {acc['SFT + GRPO']['greedy']} (CPU: SFT "
                 f"{CPU_PIPELINE['sft_accuracy']['greedy']}, GRPO {CPU_PIPELINE['grpo_accuracy']['greedy']})")


def pipeline_accuracy(results):
    """{model: {greedy, sampled}}: overall accuracy on the base test set, from pipeline.py's results.json."""
    return {model: {mode: round(by_set["base"][mode]["overall"], 4) for mode in ("greedy", "sampled")}
            for model, by_set in results["scores"].items()}


def decode_row(ctx, model, batch, graph, read_bytes=None):
    """Tokens/s and HBM share of greedy decoding, the decode steps alone (timed_steps), at the
    graphs' widths; read_bytes: the weights' bytes per element read (default: their own size)."""
    c, parameters = model.config, sum(p.numel() for p in model.parameters())
    element = read_bytes or model.embed_tokens.weight.element_size()
    with timed_steps(ctx.device) as timer:
        greedy(model, prompts_of(batch, 128), ctx.args.new_tokens if ctx.cuda else 8, graph, widths="bucket")
    steps = [(tag[1], s) for tag, s in timer.seconds() if tag[0] == "replay"]
    seconds = sum(s for _, s in steps)
    read = sum(roofline.decode_step_bytes(c, parameters, batch, width, element, 2 if ctx.cuda else 4) for width, _ in steps)
    return {"tokens_per_s": batch * len(steps) / seconds, "step_ms": 1000 * seconds / len(steps),
            "bytes_per_s": read / seconds, "hbm_share": read / seconds / (ctx.hbm * 1e12) if ctx.hbm else None}


def decode(ctx, name):
    """decode_row at batch 1 and 64, graph and eager; for the 1.5B also float32 master weights under
    bf16 autocast at batch 1, whose decode reads bf16 copies (generate.compute_dtype_weights): the
    same speed as bf16 weights when no weight is cast per step."""
    out = {f"batch {batch} {'graph' if graph else 'eager'}": decode_row(ctx, ctx.model(name), batch, graph)
           for batch in ((1, 64) if ctx.cuda else (2,)) for graph in ((True, False) if ctx.cuda else (False,))}
    if name == SMALL:
        ctx.release()
        model = checkpoint.random_model(ctx.shape(name), device=ctx.device)
        with torch.autocast(ctx.device, dtype=torch.bfloat16):
            out["batch 1 float32 weights + autocast"] = decode_row(ctx, model, 1, ctx.cuda, read_bytes=2)
        del model
    rows = ", ".join(f"{k} {v['tokens_per_s']:,.0f} tok/s" + (f" {100 * v['hbm_share']:.0f} % HBM" if v["hbm_share"] else "")
                     for k, v in out.items())
    return out, rows


def grpo(ctx, name, rank):
    """One measured GRPO step (after one warm-up) on random prompts with a text-free reward; the
    training loop's save at its last step is replaced by a no-op (TrainConfig has no way to turn it off)."""
    smoke = not ctx.cuda
    prompt_tokens, new_tokens = (16, 8) if smoke else (256, 512)
    config = RLConfig(model=ctx.shape(name), out_dir=os.path.join(ctx.scratch, f"grpo-{name}-{rank}"),
                      device=ctx.device, dtype="bfloat16", steps=2, prompts_per_step=2 if smoke else 16,
                      group_size=4 if smoke else 8, max_new_tokens=new_tokens, micro_batch_size=8, lr=1e-5,
                      warmup_steps=0, eval_every=0, save_every=1_000_000, lora_rank=rank, activation_checkpointing=True)
    examples = [{"prompt_ids": [(i * 13 + j) % 200 + 1 for j in range(prompt_tokens)]} for i in range(64)]
    ctx.release()  # the peak below is this step's alone
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from rl_worker import on_token_ids  # token-id prompts, a text-free reward, no tokenizer (issue #27)
    on_token_ids(setattr, lambda example, ids: float(sum(ids) % 2), examples)
    with patched(checkpoint, "save_checkpoint", lambda *args, **kwargs: None):
        result = train_rl(config)
    peak = torch.cuda.max_memory_allocated() if ctx.cuda else None
    planned = memory_plan.plan(config, "grpo", prompt_tokens=prompt_tokens)["total_bytes"]
    row = result.history[-1]
    # A random model never emits EOS: every trained row is prompt + new tokens long, new of them completion.
    length = prompt_tokens + new_tokens
    rows = round(row["training_tokens_per_s"] * row["training_s"] / length)
    flops = roofline.training_flops(result.model.config, [(length, new_tokens)] * rows, rank,
                                    config.lora_targets, checkpointing=True)
    out = {"peak_gib": peak / 2**30 if peak else None, "planned_gib": planned / 2**30,
           "peak_over_plan": peak / planned if peak else None, "training_tokens_per_s": row["training_tokens_per_s"],
           "training_s": row["training_s"], "step_s": row["step_s"], "training_tflop": flops / 1e12,
           "mfu": flops / row["training_s"] / (ctx.tflops * 1e12) if ctx.tflops else None}
    peak_text = "-" if peak is None else f"{out['peak_gib']:.1f} GiB ({out['peak_over_plan']:.2f}x plan)"
    mfu = "-" if out["mfu"] is None else f"{100 * out['mfu']:.1f} %"
    return out, f"peak {peak_text}, {out['training_tokens_per_s']:,.0f} train tok/s, MFU {mfu}"


# (name, estimated seconds on one H100/H200, function), in the order they run
SECTIONS = [
    ("environment", 2, environment),
    ("logits_parity", 60, logits_parity),
    ("attention", 30, attention),
    ("graph_vs_eager", 20, graph_vs_eager),
    ("train_rl_cli", 40, train_rl_cli),
    ("train_sft_cli", 40, train_sft_cli),
    ("pipeline_smoke", 150, pipeline_smoke),
    ("decode_1.5B", 40, lambda ctx: decode(ctx, SMALL)),
    ("grpo_1.5B_full", 45, lambda ctx: grpo(ctx, SMALL, 0)),
    ("capture_cost", 20, capture_cost),
    ("grpo_7B_lora_r32", 75, lambda ctx: grpo(ctx, LARGE, 32)),
    ("decode_7B", 60, lambda ctx: decode(ctx, LARGE)),
]


class Context:
    """What the sections share: the device, the scratch folder, the clock, one loaded model at a time."""

    def __init__(self, args, scratch):
        self.args, self.scratch, self.started = args, scratch, time.perf_counter()
        self.cuda = not args.cpu_smoke
        self.device = "cuda" if self.cuda else "cpu"
        self.hbm = self.tflops = None
        self.loaded = (None, None)

    def release(self):
        """Free the kept model and hand the allocator's cache back."""
        self.loaded = (None, None)
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def estimate(self, seconds):
        """A section's estimated cost here: the smoke runs every section, whatever its GPU estimate."""
        return seconds if self.cuda else 0

    def left(self):
        return self.args.budget_s - (time.perf_counter() - self.started)

    def shape(self, name, layers=None):
        return shape_file(name, not self.cuda, self.scratch, layers)

    def model(self, name):
        """The bf16 model of a shape on the device (float32 on the CPU), kept for the next section."""
        if self.loaded[0] != name:
            self.release()
            self.loaded = (name, checkpoint.random_model(self.shape(name), torch.bfloat16 if self.cuda else None,
                                                         self.device))
        return self.loaded[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: check that everything runs")
    parser.add_argument("--out", default="gpu_check.json", help="the JSON, rewritten after every section")
    parser.add_argument("--budget-s", type=cli.positive_float, default=450.0, help="skip a section whose estimate would end past this")
    parser.add_argument("--hbm-tb-s", type=cli.positive_float, default=None, help="peak HBM TB/s (default: from the device name)")
    parser.add_argument("--peak-tflops", type=cli.positive_float, default=None, help="peak dense bf16 TFLOP/s (default: from the name)")
    parser.add_argument("--new-tokens", type=cli.positive_int, default=256, help="decode steps per speed measurement")
    args = parser.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py: no CUDA device: run with --cpu-smoke on a machine without a GPU")
    if args.cpu_smoke:
        torch.set_num_threads(1)  # tiny ops: threads only contend on a busy machine
    ctx = Context(args, tempfile.mkdtemp(prefix="gpu_check_"))
    report = {"sections": {}}
    for name, estimate, run in SECTIONS:
        if ctx.estimate(estimate) > ctx.left():
            entry = {"status": "skipped: budget", "estimate_s": estimate, "left_s": round(ctx.left(), 1)}
            summary = f"skipped: budget ({estimate} s estimated, {ctx.left():.0f} s left)"
        else:
            started = time.perf_counter()
            try:
                result, summary = run(ctx)
                entry = {"status": "ok", "result": result}
            except Exception as e:  # noqa: BLE001 -- the section's error is its result
                entry = {"status": "error", **error_text(e)}
                summary = "ERROR " + entry["error"]
            entry["seconds"] = round(time.perf_counter() - started, 2)
        report["sections"][name] = entry
        write_json(args.out, report)
        print(f"{name:<16}  {summary}", flush=True)
    shutil.rmtree(ctx.scratch, ignore_errors=True)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
