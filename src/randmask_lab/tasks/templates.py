"""Causal-LM prompt templates in the style of MeZO (Malladi et al. 2023), which the paper reuses.

Same prompt text and verbalizers as MeZO's templates (most from PromptSource), written afresh.
Convention: `text + candidate` is the full sequence MeZO scores; a word that follows a space
carries that space in the candidate (" great", " the sun was rising."), because BPE tokenizers
attach the space to the next word. Candidates are listed in label order, so `gold == label`.
"""

from __future__ import annotations

from collections.abc import Callable

from .types import Example, Prompt

GEN_STOP = "\n"  # generation targets end here; decode until it (MeZO's eos for QA tasks)


def _choice(ex: Example, text: str, candidates: tuple[str, ...], golds: tuple[int, ...] = ()) -> Prompt:
    if ex.label is None or not 0 <= ex.label < len(candidates):
        raise ValueError(f"example {ex.uid} has label {ex.label!r}, not an index into {candidates}")
    return Prompt(ex.uid, text, candidates[ex.label], candidates, ex.label, ex.answers, golds)


def _generation(ex: Example, text: str) -> Prompt:
    if not ex.answers:
        raise ValueError(f"example {ex.uid} has no gold answer")
    # The stop string is part of the target so LM-loss training teaches the model to end there.
    return Prompt(ex.uid, text, f" {ex.answers[0]}{GEN_STOP}", answers=ex.answers)


def render_sst2(ex: Example) -> Prompt:
    return _choice(ex, f"{ex.fields['sentence'].strip()} It was", (" terrible", " great"))


def render_rte(ex: Example) -> Prompt:
    f = ex.fields
    text = f"{f['premise']}\nDoes this mean that \"{f['hypothesis']}\" is true? Yes or No?\n"
    return _choice(ex, text, ("Yes", "No"))  # 0 entailment, 1 not_entailment


def render_cb(ex: Example) -> Prompt:
    f = ex.fields
    text = f"Suppose {f['premise']} Can we infer that \"{f['hypothesis']}\"? Yes, No, or Maybe?\n"
    return _choice(ex, text, ("Yes", "No", "Maybe"))  # entailment, contradiction, neutral


def render_boolq(ex: Example) -> Prompt:
    # MeZO's BoolQTemplateV3, which its BoolQDataset.get_template() returns by default (template_version=2).
    question = ex.fields["question"].strip()
    question = question[:1].upper() + question[1:]
    if not question.endswith("?"):
        question += "?"
    return _choice(ex, f"{ex.fields['passage']} {question}\n", ("No", "Yes"))


def render_wic(ex: Example) -> Prompt:
    f = ex.fields
    text = (f"Does the word \"{f['word']}\" have the same meaning in these two sentences? Yes, No?\n"
            f"{f['sentence1']}\n{f['sentence2']}\n")
    return _choice(ex, text, ("No", "Yes"))


def render_wsc(ex: Example) -> Prompt:
    f = ex.fields
    text = (f"{f['text']}\nIn the previous sentence, does the pronoun \"{f['span2_text'].lower()}\" "
            f"refer to {f['span1_text']}? Yes or No?\n")
    return _choice(ex, text, ("No", "Yes"))


def render_multirc(ex: Example) -> Prompt:
    f = ex.fields
    text = (f"{f['paragraph']}\nQuestion: {f['question']}\n"
            f"I found this answer \"{f['answer']}\". Is that correct? Yes or No?\n")
    return _choice(ex, text, ("No", "Yes"))


def _copa_choice(choice: str) -> str:
    # The choice continues the premise mid-sentence: lower-case its first word, except "I".
    words = choice.strip().split(" ")
    if words[0] != "I":
        words[0] = words[0].lower()
    return " " + " ".join(words)


def render_copa(ex: Example) -> Prompt:
    f = ex.fields
    premise = f["premise"].rstrip()
    premise = premise[:-1] if premise.endswith(".") else premise
    conj = " because" if f["question"] == "cause" else " so"
    return _choice(ex, premise + conj, (_copa_choice(f["choice1"]), _copa_choice(f["choice2"])))


def render_record(ex: Example) -> Prompt:
    # MeZO's GPT-3 style: highlights become a bullet list; the query, with each entity filled
    # in, is the next bullet.
    # Every entity that is a gold answer is right ("Bhutto" as well as "Benazir Bhutto"), as MeZO
    # scores ReCoRD; the label's (the first) is the one trained on.
    passage = ex.fields["passage"].replace("@highlight\n", "- ")
    query = ex.fields["query"]
    entities = ex.fields["entities"]
    candidates = tuple(" " + query.replace("@placeholder", e) for e in entities)
    golds = tuple(i for i, e in enumerate(entities) if e in ex.answers)
    return _choice(ex, f"{passage}\n-", candidates, golds if ex.label in golds else ())


def render_squad(ex: Example) -> Prompt:
    f = ex.fields
    text = f"Title: {f['title']}\nContext: {f['context']}\nQuestion: {f['question'].strip()}\nAnswer:"
    return _generation(ex, text)


def render_drop(ex: Example) -> Prompt:
    f = ex.fields
    return _generation(ex, f"Passage: {f['passage']}\nQuestion: {f['question'].strip()}\nAnswer:")


TEMPLATES: dict[str, Callable[[Example], Prompt]] = {
    "sst2": render_sst2, "rte": render_rte, "cb": render_cb, "boolq": render_boolq,
    "wsc": render_wsc, "wic": render_wic, "multirc": render_multirc, "copa": render_copa,
    "record": render_record, "squad": render_squad, "drop": render_drop,
}
