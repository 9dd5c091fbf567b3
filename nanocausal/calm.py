"""CaLM-Lite (English), the causal-reasoning benchmark of OpenCausaLab/CaLM, with CaLM's own prompts
and labelling: what eval.py runs on files of ../shared/data/calm_lite/.

Source: OpenCausaLab/CaLM at commit 1c1e93a: the prompt of each task is its module of
calm/data_processing/prompt/ (get_prompt), the label of a reply calm/evaluation/labeling/ (see
nanocausal.calm_labels), the score calm/evaluation/accuracy/, the random-guess figures
calm/evaluation/element_properties/random_guess.py, the rungs calm/data_processing/task_hiearchy.py.

  - a task is a file stem (CORR-B_correlation_EN); its items are JSON Lines with a `gt_answer`.
  - the prompt is CaLM's template of the prompt style, filled with the item's fields (Python's %).
    Styles here: "basic" (CaLM-Lite's) and "zero-shot-CoT"; not the IcL, manual-CoT, adversarial or
    explicit-function styles, nor the Chinese (_CN) tasks. nanocausal sends the prompt as the user
    message through the model's chat template (CaLM's runners feed the bare prompt to `generate`
    with 120-400 new tokens, or to an API at temperature 0).
  - a reply is correct when its label (calm_labels) equals the item's gold label; for the -P
    (probability) tasks when both, rounded to 4 decimals, are equal.
  - CEG-O_E-CARE (explaining why a cause leads to an effect) is not scored here: CaLM scores it by
    ROUGE-L recall against a reference explanation, a graded score rather than a label.
  - accuracy = correct samples / scored samples, per task, per rung of CaLM's causal ladder
    (association, intervention, counterfactual, causal discovery) and overall.

The -P *basic* items are CauGym's base.json problems: their basic prompt is the CauGym problem
text, so the `oracle` answers them with nanocausal.problem_text.solve.
"""
import json
import os
import re

from nanocausal import calm_labels as labels, safe_files
from nanocausal.problem_text import PROVIDE, PROVIDE_PROB

STYLES = ("basic", "zero-shot-CoT")
RUNGS = ("association", "intervention", "counterfactual", "causal_discovery")
_STEP = " Let's think step by step."
_JSON_YES_NO, _JSON_PROB = "\n" + PROVIDE, "\n" + PROVIDE_PROB  # as a CauGym problem ends
_GRAPH = "You will be presented with a causal graph in the following form: %s.\nQuestion: "
_YES_NO = "\nAnswer (Yes or No ?):"
_SET_FIELDS = ("edges", "treatment", "outcome", "option1", "option2", "option3")
_PAIR = " relative to an ordered pair of variables (%s, %s) in the above causal graph?"
_THREE = "\nOption 1: %s\nOption 2: %s\nOption 3: %s\nAnswer (Option 1 or Option 2 or Option 3 ?):"
_BACKDOOR = " satisfies the back-door criterion"


def _styles(question, answer, basic_gap=""):
    """{style: template} of a prompt whose zero-shot-CoT form puts the step sentence between its
    question and its answer line (where the basic form has basic_gap)."""
    return {"basic": question + basic_gap + answer, "zero-shot-CoT": question + _STEP + answer}


def _set_styles(question):
    """The templates of a -C set task: which set of variables (question) for the pair, three options."""
    return _styles(_GRAPH + question + _PAIR, _THREE)


# prompt group -> (the item fields it is filled with, {style: template}); one group per CaLM module
# (modules with the same templates share a group).
PROMPTS = {
    "cladder": (("given_info", "question"), _styles("Input Info: %s\nQuestion: %s", _YES_NO)),
    "effect": (("given_info", "Background", "Instruction", "Question"),
               _styles("Input Info: %s\n%s\nInstruction: %s\nQuestion: %s", _JSON_YES_NO)),
    "pn_ps": (("given_info", "Background", "Instruction", "Question"),
              _styles("Input Info: %s\n%s\nInstruction: %s\nQuestion: %s", _JSON_PROB)),
    "causal_judgement": (("input",), {
        "basic": "Question: %s \nAnswer (Yes or No ?):",
        "zero-shot-CoT": "Question: %s\nLet's think step by step.\nAnswer (Yes or No ?):"}),
    "abstract_reasoning": (("ar_edges", "former", "latter"), {
        "basic": "Input Event: If %s.\nQuestion: Does %s cause %s?  \nAnswer (Yes or No ?): ",
        "zero-shot-CoT": "Input Event: If %s.\nQuestion: Does %s cause %s?" + _STEP + _YES_NO}),
    "ancestor": (("edges", "sampled_ancestor", "attribution"),
                 _styles(_GRAPH + "Does %s serve as the ancestor node of %s?", _YES_NO)),
    "parent": (("edges", "sampled_parent", "attribution"),
               _styles(_GRAPH + "Does %s serve as the parent node of %s?", _YES_NO)),
    "identification": (("di_edges", "bi_edges", "treatment", "outcome"), _styles(
        "You will be presented with a causal graph in the following form: %s.\nThere exist unobserved confounders "
        "between: %s.\nQuestion: Whether the causal effect of %s on %s is identified or not?", _YES_NO, basic_gap=" ")),
    "event_causality": (("words", "events"), {
        "basic": 'Input: %s\nQuestion: is there a causal relationship between "%s" and "%s" ?' + _YES_NO,
        "zero-shot-CoT": 'Input: %s\nQuestion: is there a causal relationship between "%s" and "%s" ?' + _STEP
                         + "\nAnswer:"}),
    "pairwise_binary": (("premise", "hypothesis"), _styles(
        "Event A: %s\nEvent B: %s\nQuestion: is there a causal relationship between Event A and Event B ?", _YES_NO)),
    "pairwise_choice": (("premise", "ask-for", "hypothesis1", "hypothesis2"), _styles(
        "Input Event: %s\nQuestion: Please select the %s of the input event from the following options.",
        "\nOption 1: %s\nOption 2: %s\nAnswer (Option 1 or Option 2 ?):")),
    "max_bas": (_SET_FIELDS, _set_styles("Which is the maximal set of variables that" + _BACKDOOR)),
    "min_bas": (_SET_FIELDS, _set_styles("Which is the minimal set of variables that" + _BACKDOOR)),
    "mix_bas": (_SET_FIELDS, _set_styles("Which set of variables that" + _BACKDOOR)),
    "frontdoor": (_SET_FIELDS, _set_styles("Which set of variables that satisfies the front-door criterion")),
    "instrument": (_SET_FIELDS, {  # CaLM's basic template says "instrumental", its zero-shot-CoT "instrument"
        "basic": _GRAPH + "Which set of variables is the instrumental variables" + _PAIR + _THREE,
        "zero-shot-CoT": _GRAPH + "Which set of variables is the instrument variables" + _PAIR + _STEP + _THREE}),
    "crass": (("premise", "QCC", "Answer1", "Answer2", "Answer3", "Answer4"), {
        "basic": "Input Event: %s\nCounterfactual Question: %s\nOption 1: %s\nOption 2: %s\nOption 3: %s\n"
                 "Option 4: %s\nAnswer (Option 1 or 2 or 3 or 4?):",
        "zero-shot-CoT": "Input Event: %s\n    Counterfactual Question: %s" + _STEP + "\n    Option 1: %s\n    "
                         "Option 2: %s\n    Option 3: %s\n    Option 4: %s\n    Answer (Option 1 or 2 or 3 or 4?):"}),
    "explanation": (("cause", "effect"),
                    _styles("Cause: %s\nEffect: %s\nQuestion: why the cause can lead to the effect ?", "\nAnswer:")),
}

# task -> (rung, prompt group, labelling family, CaLM's random-guess accuracy in %; None where CaLM
# gives none). The -P hard tasks are not in CaLM-Lite's English files here but share the prompts.
TASKS = {
    "CORR-B_correlation_EN": ("association", "cladder", "cladder", 50.0),
    "EAE-B_exp-away_EN": ("association", "cladder", "cladder", 50.0),
    "ATE-B_ATE-natural_EN": ("intervention", "effect", "natural", 50.0),
    "ATE-P_ATE-basic_EN": ("intervention", "effect", "probability", None),
    "ATE-P_ATE-hard_EN": ("intervention", "effect", "probability", None),
    "BAS-B_backadj_EN": ("intervention", "cladder", "cladder", 50.0),
    "BAS-C_max-BAS_EN": ("intervention", "max_bas", "adjustment_set", 33.3),
    "BAS-C_min-BAS_EN": ("intervention", "min_bas", "adjustment_set", 33.3),
    "BAS-C_mix-BAS_EN": ("intervention", "mix_bas", "adjustment_set", 33.3),
    "CEI-B_0.2-UC_EN": ("intervention", "identification", "identification", 50.0),
    "CEI-B_0.4-UC_EN": ("intervention", "identification", "identification", 50.0),
    "CEI-B_0.6-UC_EN": ("intervention", "identification", "identification", 50.0),
    "CEI-B_0.8-UC_EN": ("intervention", "identification", "identification", 50.0),
    "CB-B_collider-bias_EN": ("intervention", "cladder", "cladder", 50.0),
    "CDE-B_CDE-natural_EN": ("intervention", "effect", "natural", 50.0),
    "CDE-P_CDE-basic_EN": ("intervention", "effect", "probability", None),
    "CDE-P_CDE-hard_EN": ("intervention", "effect", "probability", None),
    "FAS-C_FAS_EN": ("intervention", "frontdoor", "adjustment_set", 33.3),
    "IV-C_CaLM-IV_EN": ("intervention", "instrument", "adjustment_set", 33.3),
    "AC-B_causal_judgement_EN": ("counterfactual", "causal_judgement", "causal_judgement", 50.0),
    "CEG-O_E-CARE_EN": ("counterfactual", "explanation", "open", None),
    "CR-B_det-counterfactual_EN": ("counterfactual", "cladder", "cladder", 50.0),
    "CR-C_CRASS_EN": ("counterfactual", "crass", "crass", 25.0),
    "ETT-B_ETT-natural_EN": ("counterfactual", "effect", "natural", 50.0),
    "ETT-P_ETT-basic_EN": ("counterfactual", "effect", "probability", None),
    "ETT-P_ETT-hard_EN": ("counterfactual", "effect", "probability", None),
    "NDE-B_NDE-natural_EN": ("counterfactual", "effect", "natural", 50.0),
    "NDE-P_NDE-basic_EN": ("counterfactual", "effect", "probability", None),
    "NDE-P_NDE-hard_EN": ("counterfactual", "effect", "probability", None),
    "NIE-B_NIE-natural_EN": ("counterfactual", "effect", "natural", 50.0),
    "NIE-P_NIE-basic_EN": ("counterfactual", "effect", "probability", None),
    "NIE-P_NIE-hard_EN": ("counterfactual", "effect", "probability", None),
    "PN-P_PN-basic_EN": ("counterfactual", "pn_ps", "probability", None),
    "PN-P_PN-hard_EN": ("counterfactual", "pn_ps", "probability", None),
    "PS-P_PS-basic_EN": ("counterfactual", "pn_ps", "probability", None),
    "PS-P_PS-hard_EN": ("counterfactual", "pn_ps", "probability", None),
    "AR-B_CaLM-AR_EN": ("causal_discovery", "abstract_reasoning", "abstract_reasoning", 50.0),
    "CA-B_FA_EN": ("causal_discovery", "ancestor", "ancestor", 50.0),
    "CA-B_FP_EN": ("causal_discovery", "parent", "parent", 50.0),
    "ECI-B_CTB_EN": ("causal_discovery", "event_causality", "event_causality", 50.0),
    "ECI-B_ESC_EN": ("causal_discovery", "event_causality", "event_causality", 50.0),
    "ECI-B_MAVEN-ERE_EN": ("causal_discovery", "event_causality", "event_causality", 50.0),
    "PCD-B_COPA_EN": ("causal_discovery", "pairwise_binary", "pairwise_binary", 50.0),
    "PCD-B_E-CARE_EN": ("causal_discovery", "pairwise_binary", "pairwise_binary", 50.0),
    "PCD-C_COPA_EN": ("causal_discovery", "pairwise_choice", "pairwise_choice", 50.0),
    "PCD-C_E-CARE_EN": ("causal_discovery", "pairwise_choice", "pairwise_choice", 50.0),
}


# family -> (its labelling rule in calm_labels, the item's gold label as CaLM's get_gt_label reads it)
_AS_IS = lambda item: item["gt_answer"]
_OPTION_NUMBER = lambda item: int(item["gt_answer"])  # CR-C and the -C set tasks write it as a string
FAMILIES = {
    "cladder": (labels.cladder, lambda item: {"yes": 1, "no": 0}[item["gt_answer"]]),
    "causal_judgement": (labels.causal_judgement, lambda item: {"Yes": 1, "No": 0}[item["gt_answer"]]),
    "abstract_reasoning": (labels.abstract_reasoning, _AS_IS),
    "ancestor": (labels.ancestor, _AS_IS),
    "parent": (labels.parent, _AS_IS),
    "identification": (labels.identification, _AS_IS),
    "event_causality": (labels.event_causality, _AS_IS),
    "pairwise_binary": (labels.pairwise_binary, _AS_IS),
    "pairwise_choice": (labels.pairwise_choice, _AS_IS),
    "adjustment_set": (labels.adjustment_set, _OPTION_NUMBER),
    "crass": (labels.crass, _OPTION_NUMBER),
    # "Yes" / "No", compared with the reply's "answer" value
    "natural": (labels.natural, lambda item: item["gt_answer"].strip().lower()),
    "probability": (labels.probability, _AS_IS),
    "open": (None, _AS_IS),
}

# ----------------------------------------------------------------------------- prompts


def _task(task):
    if task not in TASKS:
        hint = " (only CaLM's English tasks are known)" if task.endswith("_CN") else ""
        raise ValueError(f"no CaLM prompt for task {task!r}{hint}: a CaLM task file is named after its task, "
                         f"e.g. CORR-B_correlation_EN.json")
    return TASKS[task]


def _values(item, group):
    """The values a group's template is filled with, as CaLM's get_prompt reads them from the item."""
    if group == "event_causality":  # the sentence and both events are joined from the item's words
        words = item["words"]
        return (" ".join(words),) + tuple(" ".join(words[t] for t in event) for event in item["events"][:2])
    if group in ("effect", "pn_ps"):  # the data statements are Background.data_info
        return item["given_info"], item["Background"]["data_info"], item["Instruction"], item["Question"]
    return tuple(item[field] for field in PROMPTS[group][0])


def prompt(item, task, style="basic"):
    """The prompt CaLM's get_prompt builds for `item` of `task` in `style` (module docstring)."""
    group = _task(task)[1]
    if style not in STYLES:
        raise ValueError(f"unknown CaLM prompt style {style!r}, expected one of {', '.join(STYLES)}")
    return PROMPTS[group][1][style] % _values(item, group)

# ----------------------------------------------------------------------------- labels and scores


def gold_label(item, task):
    return FAMILIES[_task(task)[2]][1](item)


def scored(task):
    return _task(task)[2] != "open"


def label_and_score(response, item, task, style="basic"):
    """The label CaLM gives `response` and its score: 1 / 0 (yes / no) or -1 for the binary tasks,
    the option number or -1 for the choice tasks (PCD-C: 0 or 1 or -1), a float or None for the -P
    tasks, the "answer" value or None for the -B effect tasks; correct when the label equals the
    gold label (-P tasks: both rounded to 4 decimals). (None, None) without a response, and for
    CEG-O_E-CARE, which is not scored here (module docstring)."""
    family = _task(task)[2]
    if family == "open" or response is None:
        return None, None
    label, gold = FAMILIES[family][0](response.strip().lower(), item, style, task), gold_label(item, task)
    if family == "probability":
        return label, label is not None and round(label, 4) == round(gold, 4)
    return label, label == gold


def gold_reply(item, task):
    """The reply of the `gold` pseudo-model: the gold label in the form the task's prompt asks for."""
    family, gold = _task(task)[2], gold_label(item, task)
    if family == "open":
        return gold
    if family == "natural":
        return json.dumps({"ANSWER": item["gt_answer"].strip()})
    if family == "probability":
        # PN and PS ask for the PROB only; the others also for the Yes/No the item's Reason states
        stated = re.search(r"the answer is (Yes|No)", json.dumps(item.get("Reason", "")))
        answer = {"ANSWER": stated.group(1)} if stated and _task(task)[1] == "effect" else {}
        return json.dumps({**answer, "PROB": f"{gold:.4f}"})
    if family in ("adjustment_set", "crass"):
        return f"Option {gold}"
    if family == "pairwise_choice":
        return f"Option {gold + 1}"
    return "Yes" if gold == 1 else "No"

# ----------------------------------------------------------------------------- files


def is_task_file(path):
    """A CaLM task file: a .json file named like a CaLM task (CODE-X_subset_EN), or whose first line
    is a JSON object with a gt_answer."""
    stem, ext = os.path.splitext(os.path.basename(path))
    if ext != ".json" or not os.path.isfile(path):
        return False
    if re.fullmatch(r"[A-Z]+-[A-Z]_.+_(EN|CN)", stem):
        return True
    with open(path, encoding="utf-8") as f:
        try:
            first = json.loads(f.readline())
        except (ValueError, RecursionError):  # not CaLM's JSON (or UTF-8): the CauGym reader says what is wrong
            return False
    return isinstance(first, dict) and "gt_answer" in first


def load_task(path):
    """A CaLM task file (JSON Lines, one item a line, named after its task) -> (task, items). Raises
    ValueError naming the file (and line, field) when it is empty, its task has no known prompt, or
    an item lacks what its prompt and its label need."""
    task = os.path.splitext(os.path.basename(path))[0]
    try:
        group = _task(task)[1]
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    needed = PROMPTS[group][0] + ("gt_answer",)
    items = []
    for item, where in safe_files.read_records(path):
        if not isinstance(item, dict):
            raise ValueError(f"{where}: not a JSON object; a CaLM task file has one item per line")
        for field in needed + (("Background.data_info",) if group in ("effect", "pn_ps") else ()):
            head, _, sub = field.partition(".")
            if head not in item or sub and not (isinstance(item[head], dict) and sub in item[head]):
                raise ValueError(f"{where}: field '{field}' missing: not an item of CaLM task {task} "
                                 f"(its items have {', '.join(needed)})")
        try:
            prompt(item, task), gold_label(item, task)
        except (KeyError, TypeError, IndexError, ValueError) as error:
            raise ValueError(f"{where}: an item of CaLM task {task} whose fields do not fit its prompt or "
                             f"label ({type(error).__name__}: {error})") from None
        items.append(item)
    if not items:
        raise ValueError(f"{path}: empty file, expected one CaLM item (a JSON object) per line")
    return task, items


def load_dataset(spec, style="basic"):
    """A CaLM --data entry (a task file or a folder of them) -> (name, evaluation items). An item is
    {prompt (messages), type (the task), rung, style, answer (gold label), calm (the CaLM item)}, plus
    `problem` (the basic prompt, a CauGym problem text) for the -P tasks, which the oracle solves."""
    if os.path.isdir(spec):  # every .json file under it
        name = os.path.basename(os.path.normpath(spec))
        paths = sorted(os.path.join(root, file) for root, _, files in os.walk(spec)
                       for file in files if file.endswith(".json"))
        if not paths:
            raise ValueError(f"{spec}: no CaLM task files (*.json) in this folder")
    else:
        name, paths = os.path.splitext(os.path.basename(spec))[0], [spec]
    out = []
    for path in paths:
        task, items = load_task(path)
        rung, _, family, _ = TASKS[task]
        for item in items:
            row = {"prompt": [{"role": "user", "content": prompt(item, task, style)}], "type": task, "rung": rung,
                   "style": style, "answer": gold_label(item, task), "calm": item}
            if family == "probability":
                row["problem"] = prompt(item, task, "basic")
            out.append(row)
    return name, out

# ----------------------------------------------------------------------------- the table


def format_table(columns):
    """columns: {name: {task or rung or "overall": accuracy, "_tasks": the tasks evaluated}} -> a
    Markdown table in percent: tasks grouped by rung, each rung's row after its tasks, CaLM's
    random-guess figure beside each task; "-" where nothing was scored."""
    names = list(columns)
    present = [t for t in TASKS if any(t in columns[n].get("_tasks", ()) for n in names)]
    lines = ["| task | random | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]

    def row(label, random, key):
        cells = [f"{100 * columns[n][key]:.1f}" if key in columns[n] else
                 "not scored" if key in columns[n].get("_tasks", ()) and not scored(key) else "-" for n in names]
        lines.append(f"| {label} | {random} | " + " | ".join(cells) + " |")
    for rung in RUNGS:
        tasks = [t for t in present if TASKS[t][0] == rung]
        for task in tasks:
            row(task, "-" if TASKS[task][3] is None else f"{TASKS[task][3]:.1f}", task)
        if tasks:
            row(f"**{rung}**", "", rung)
    row("**overall**", "", "overall")
    return "\n".join(lines)
