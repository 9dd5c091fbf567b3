"""
Score a model on CauGym exactly as the paper does (the official protocol of OpenCausaLab/CauGym,
eval/sample_generate.py + eval/sample_evaluate.py; see ../shared/data/caugym/README.md):

  - user message = problem + "\\n" + "Let's think step by step." (insufficient.json also gets
    'If the condition is not enough to solve the question, output "LACK_CONDITION" as final answer.'),
    rendered with the model's own chat template;
  - 5 samples per problem at temperature 0.6, top_p 0.95, at most 8192 new tokens;
  - a sample is correct when any answer JSON in it has a PROB within 0.0005 of the gold PROB
    (nanocausal.caugym.is_correct), or, for gold LACK_CONDITION, when it contains LACK_CONDITION;
  - accuracy = correct samples / all samples, per task (Type) and overall.

With several samples per problem (--num-samples n > 1, at a temperature > 0) it also prints, per
task, pass@1 (the accuracy above), pass@n (Chen et al. 2021's unbiased estimator: some sample is
right) and maj@n (the majority vote on the final answers' PROB is right): whether training sharpened
pass@1 or widened coverage (nanocausal/pass_at_k.py).

It prints a table (rows: the seven tasks and overall; columns: the data sets), writes every
response to <out>/responses.jsonl and the scores to <out>/summary.json. Rerunning the same command
resumes: problems whose samples are already in responses.jsonl are skipped. Everything is checked
before anything is written (flags, --device, the data files, the model, and that every prompt fits
the model's context: a longer one is refused with its file and line, not skipped, since accuracy
over a silently smaller set is not the protocol's number), so a refused command never blocks its
corrected rerun.

`--model oracle` answers with nanocausal.problem_text.solve (the symbolic solver): it must score 100 %, an
upper bound and a check of the whole pipeline (prompts, files, scoring).

One GPU (the paper's protocol, full test sets):
    python eval.py --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B \\
        --data ../shared/data/caugym/base.json ../shared/data/caugym/deconfounding.json \\
               ../shared/data/caugym/insufficient.json --batch-size 64 --out runs/eval-r1-1.5b
Laptop (CPU; a 70-problem slice of base, 10 per task, shorter replies; 19 minutes on one core):
    python eval.py --model ~/.cache/nanocausal/smollm2-135m-instruct \\
        --data ../shared/data/caugym/base.json --per-task 10 --max-new-tokens 256 --batch-size 14 \\
        --out runs/eval-smollm2
Several GPUs (each rank holds the model and answers every N-th problem; one responses.jsonl):
    torchrun --standalone --nproc-per-node 8 eval.py --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B \\
        --data ../shared/data/caugym/base.json --batch-size 64 --out runs/eval-r1-1.5b
The oracle (seconds):
    python eval.py --model oracle --data ../shared/data/caugym/base.json --out runs/eval-oracle
Generated sets instead of files: --data gen:deconfounding:200 (problems.generate) or tiny:200
(the tiny curriculum of nanocausal/tiny.py).

CaLM-Lite (nanocausal/calm.py): CaLM's own prompts ("basic", or --prompt-style zero-shot-CoT) and
labelling, accuracy per task, per rung of the causal ladder and overall beside CaLM's random-guess
figures. --data takes task files (CORR-B_correlation_EN.json) or folders of them. CaLM's own runners
generate 120-400 tokens with the checkpoint's defaults or call APIs at temperature 0: --temperature 0
and a short --max-new-tokens are the CaLM-like choice. One GPU (not run here), all 39 English tasks:
    python eval.py --model Qwen/Qwen2.5-7B-Instruct --data ../shared/data/calm_lite --temperature 0 \\
        --max-new-tokens 512 --batch-size 64 --out runs/calm-qwen2.5-7b
Pipeline checks without a model (seconds): `--model gold` answers every item with its gold label as
the prompt asks for it (100 % on every scored task), `--model oracle` solves the -P tasks (100 %):
    python eval.py --model gold --data ../shared/data/calm_lite --num-samples 1 --out runs/calm-gold

Where things are: the protocol's constants and scoring rule are nanocausal/caugym.py, running it
on a model (answering, scoring, resuming, the table) nanocausal/evaluation.py.
"""
from nanocausal import cli, evaluation
from nanocausal.evaluation import EvalConfig


def main():
    parser = cli.parser_for(__doc__)
    cli.add_config_args(parser, EvalConfig)["what to evaluate"].add_argument(
        "--rescore", default=None, help="instead of sampling, score the responses of a responses.jsonl file (fields "
        "response, answer, type, dataset; e.g. written by another engine) with the official rule")
    args = parser.parse_args()
    if args.rescore:
        return evaluation.rescore(args.rescore)
    if args.model is None or args.data is None:
        parser.error("--model and --data are required (unless --rescore)")
    return evaluation.run(cli.config_from_args(EvalConfig, args))


if __name__ == "__main__":
    cli.run_main(main)
