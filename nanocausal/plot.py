"""Curves of one or more runs, drawn from their metrics.jsonl into one PNG.

    python -m nanocausal.plot runs/pipeline/grpo                    # -> runs/pipeline/grpo/curves.png
    python -m nanocausal.plot runs/a runs/b --out compare.png       # two runs overlaid
    python -m nanocausal.plot lr3e-5=runs/a lr1e-4=runs/b --smooth 0.8   # named runs, EMA-smoothed
    python -m nanocausal.plot --results runs/pipeline                  # pipeline.py's results.png

A RUN_DIR is a training out_dir (or a metrics.jsonl itself); NAME=RUN_DIR names it in the legend
(default: the folder's name). Needs matplotlib (pip install matplotlib, or pip install -e '.[plot]');
it renders with Agg, so no display is needed. It can run while the run is training: the loop
flushes whole lines, and a last line still being written is left for the next plot.

One panel per group of PANELS that some run logged. The x axis is the optimiser step; a run is
one colour in every panel, a key one line style. From Python: plot_runs, plot_results (pipeline.py).
"""
import math
import numbers
import os

from nanocausal import cli, safe_files

# (title, keys): the keys are those of metrics.jsonl rows (training.py's loop, rl.py, losses.py).
PANELS = (
    ("reward and accuracy", ("reward", "accuracy", "format_rate", "eval_acc", "reward_accuracy")),
    ("preference rewards (DPO, KTO)", ("chosen_reward", "rejected_reward", "reward_margin",
                                       "desirable_reward", "undesirable_reward")),
    ("completion length (tokens)", ("completion_len", "completion_len_max")),
    ("truncated (share of completions)", ("truncated",)),
    ("KL and entropy", ("kl", "approx_kl", "entropy")),
    ("loss", ("loss", "policy_loss", "value_loss", "nll")),
    ("grad norm (before clipping)", ("grad_norm",)),
    ("seconds per step", ("generation_s", "reward_s", "training_s", "step_s")),
)
LINE_STYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)))


def read_metrics(path):
    """The rows of a metrics.jsonl (a list of dicts, each with a "step"); ValueError naming the
    file and line for anything else. A half-written last line (a live run) is left for the next plot."""
    located = safe_files.read_records(path, partial_last_line=True)
    for row, where in located:
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object per line, got {type(row).__name__}")
        if not isinstance(row.get("step"), numbers.Real):
            raise ValueError(f"{where}: no numeric \"step\" (each row of metrics.jsonl has one)")
    if not located:
        raise ValueError(f"{path}: no rows (an empty metrics.jsonl: has the run finished its first step?)")
    return [row for row, _ in located]


def metrics_path(run_dir):
    """RUN_DIR/metrics.jsonl, or RUN_DIR itself when it is the file."""
    path = run_dir if os.path.isfile(run_dir) else os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file (expected a training out_dir holding metrics.jsonl)")
    return path


def run_name(run_dir):
    path = os.path.abspath(run_dir)  # (normalised: no trailing slash)
    return os.path.basename(os.path.dirname(path) if os.path.isfile(path) else path)


def curve(rows, key, smooth=0.0):
    """(steps, values) of the rows holding a number under key; smooth > 0: an exponential moving
    average, value_t = smooth * value_{t-1} + (1 - smooth) * x_t, as TensorBoard's slider does
    (bias-corrected, so the first points are not pulled toward 0). NaN/inf are left out."""
    points = [(row["step"], float(row[key])) for row in rows
              if isinstance(row.get(key), numbers.Real) and math.isfinite(row[key])]
    steps = [step for step, _ in points]
    values = [value for _, value in points]
    if smooth > 0:
        average, smoothed = 0.0, []
        for i, value in enumerate(values, 1):
            average = smooth * average + (1 - smooth) * value
            smoothed.append(average / (1 - smooth ** i))
        values = smoothed
    return steps, values


def new_figure(width, height):
    """A matplotlib Figure without pyplot: no global state, no display, the same under pipeline.py
    as here. ValueError (one line) without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ValueError("plotting needs matplotlib: pip install matplotlib (or pip install -e '.[plot]')") from None
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_runs(run_dirs, out_png, names=None, smooth=0.0):
    """Write the curves of run_dirs (out_dirs, or metrics.jsonl files) to out_png, overlaid; names:
    the runs' legend names (default: folder names); smooth: the EMA weight of curve(). Returns the
    titles of the panels drawn; ValueError (one line) for bad input or nothing to plot."""
    if not 0 <= smooth < 1:
        raise ValueError(f"--smooth must be in [0, 1), got {smooth}")
    names = list(names) if names else [run_name(d) for d in run_dirs]
    if len(names) != len(run_dirs):
        raise ValueError(f"{len(names)} names for {len(run_dirs)} runs")
    runs = [(name, read_metrics(metrics_path(d))) for name, d in zip(names, run_dirs)]
    logged = {key for _, rows in runs for row in rows for key in row}
    panels = [(title, [key for key in keys if key in logged]) for title, keys in PANELS]
    panels = [(title, keys) for title, keys in panels if keys]
    if not panels:
        known = sorted({key for _, keys in PANELS for key in keys})
        raise ValueError(f"nothing to plot in {', '.join(metrics_path(d) for d in run_dirs)}: "
                         f"it logs {', '.join(sorted(logged))}; the panels read {', '.join(known)}")

    columns = 1 if len(panels) == 1 else 2
    grid_rows = math.ceil(len(panels) / columns)
    figure = new_figure(6.5 * columns, 3.4 * grid_rows)  # after the checks of the data, which need no matplotlib
    from matplotlib.lines import Line2D
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for index, (title, keys) in enumerate(panels):
        axes = figure.add_subplot(grid_rows, columns, index + 1)
        for (name, rows), colour in zip(runs, colours):
            for key, style in zip(keys, LINE_STYLES):
                steps, values = curve(rows, key, smooth)
                if not steps:
                    continue
                # A sparse key (eval_acc, every --eval-every steps) gets markers: a few points joined
                # by straight lines would pass for a measured curve.
                marker = "o" if len(steps) <= 0.2 * len(rows) or len(steps) < 3 else None
                axes.plot(steps, values, color=colour, linestyle=style, marker=marker, markersize=3, linewidth=1.2)
        # Each panel's legend says which line style is which key; the figure's says which colour
        # is which run, once, instead of runs x keys entries in every panel.
        axes.legend(handles=[Line2D([], [], color="0.25", linestyle=style, label=key)
                             for key, style in zip(keys, LINE_STYLES)], fontsize=7)
        axes.set_title(title, fontsize=10)
        axes.set_xlabel("step", fontsize=8)
        axes.tick_params(labelsize=8)
        axes.grid(alpha=0.3)
    figure.legend(handles=[Line2D([], [], color=colour, linewidth=2, label=name) for (name, _), colour in zip(runs, colours)],
                  loc="outside upper center", ncols=min(len(runs), 4), fontsize=9,
                  title="EMA-smoothed, weight %g" % smooth if smooth else None, title_fontsize=8)
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    figure.savefig(out_png, dpi=100)
    return [title for title, _ in panels]


def plot_results(pipeline_out, out_png=None):
    """results.png of a pipeline.py run (its --out folder, holding results.json): on the left the
    rollout reward per step of the RL methods (from their metrics.jsonl, EMA-smoothed 0.8 over the
    raw values drawn faint), on the right every model's overall accuracy per test set, greedy
    (hatched) and sampled, with the constant answer as a black line. Returns the PNG's path."""
    results = safe_files.read_json(os.path.join(pipeline_out, "results.json"))
    out_png = out_png or os.path.join(pipeline_out, "results.png")
    figure = new_figure(15, 4.6)
    rewards, bars = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    models = list(results["scores"])
    colours = {model: f"C{i}" for i, model in enumerate(models)}  # one colour per model in both panels
    for model in results["reward_curves"]:
        rows = read_metrics(metrics_path(os.path.join(pipeline_out, results["run_dirs"][model])))
        rewards.plot(*curve(rows, "reward"), color=colours[model], alpha=0.25, linewidth=1)
        rewards.plot(*curve(rows, "reward", smooth=0.8), color=colours[model], linewidth=2, label=model)
    rewards.set(title="RL rollout reward (correct + 0.1 x well-formed; faint: raw, bold: EMA 0.8)", xlabel="step")
    rewards.legend(fontsize=8)
    test_sets = list(results["constant_answer"])
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        for j, mode in enumerate(("greedy", "sampled")):
            xs = [2 * k + j + (i - (len(models) - 1) / 2) * width for k in range(len(test_sets))]
            heights = [100 * results["scores"][model][name][mode]["overall"] for name in test_sets]
            bars.bar(xs, heights, width, color=colours[model], hatch="//" if mode == "greedy" else None,
                     edgecolor="white", label=model if mode == "sampled" else None)
    for k, name in enumerate(test_sets):
        constant = 100 * results["constant_answer"][name]["overall"]
        bars.hlines(constant, 2 * k - 0.5, 2 * k + 1.5, color="black", linewidth=1.5,
                    label="constant answer" if k == 0 else None)
    bars.set_xticks([2 * k + j for k in range(len(test_sets)) for j in range(2)],
                    [f"{name}\n{mode}" for name in test_sets for mode in ("greedy", "sampled")], fontsize=8)
    bars.set(title="overall accuracy (%) on held-out problems", ylim=(0, 100))
    bars.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    for axes in (rewards, bars):
        axes.grid(alpha=0.3)
    figure.savefig(out_png, dpi=100)
    return out_png


def main(argv=None):
    p = cli.parser_for(__doc__)
    p.prog = "python -m nanocausal.plot"
    p.add_argument("runs", nargs="*", metavar="RUN_DIR",
                   help="training out_dirs (or metrics.jsonl files) to overlay; NAME=RUN_DIR names one in the legend")
    p.add_argument("--results", metavar="PIPELINE_OUT", default=None,
                   help="instead: draw results.png of a pipeline.py run from its --out folder (rewards and accuracies)")
    p.add_argument("--out", default=None,
                   help="PNG to write (default: RUN_DIR/curves.png for one run, curves.png here for several)")
    p.add_argument("--smooth", type=float, default=0.0,
                   help="exponential moving average weight in [0, 1) for noisy curves such as RL rewards (0: raw)")
    args = p.parse_args(argv)
    if args.results:
        print(f"wrote {plot_results(args.results, args.out)}")
        return
    if not args.runs:
        p.error("give RUN_DIRs to plot, or --results PIPELINE_OUT")
    run_dirs, names = [], []
    for text in args.runs:  # NAME=RUN_DIR, or RUN_DIR (an existing path holding "=" is a path)
        name, _, path = text.partition("=")
        if not (name and path) or os.path.exists(text):
            name, path = run_name(text), text
        run_dirs.append(path)
        names.append(name)
    out = args.out
    if out is None:
        folder = run_dirs[0] if os.path.isdir(run_dirs[0]) else os.path.dirname(os.path.abspath(run_dirs[0]))
        out = os.path.join(folder, "curves.png") if len(run_dirs) == 1 else "curves.png"
    panels = plot_runs(run_dirs, out, names=names, smooth=args.smooth)
    print(f"wrote {out} ({len(panels)} panels: {', '.join(panels)})")


if __name__ == "__main__":
    cli.run_main(main)
