"""Each MeZO-style template rendered for one known example, asserted as the exact string."""

from __future__ import annotations

import pytest

from randmask_lab.tasks import TASK_NAMES, Example, get_task


def render(name, ex):
    return get_task(name).render(ex)


def test_sst2(pools):
    p = render("sst2", pools("sst2").test[0])
    assert p.text == "it 's a charming and often affecting journey . It was"
    assert p.candidates == (" terrible", " great") and p.gold == 1 and p.target == " great"


def test_rte(pools):
    p = render("rte", pools("rte").test[0])
    assert p.text == (
        "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, "
        "according to the Christopher Reeve Foundation.\n"
        'Does this mean that "Christopher Reeve had an accident." is true? Yes or No?\n'
    )
    assert p.candidates == ("Yes", "No") and p.gold == 1 and p.target == "No"


def test_cb(pools):
    p = render("cb", pools("cb").test[0])
    assert p.text == (
        "Suppose Valence the void-brain, Valence the virtuous valet. Why couldn't the figger choose "
        "his own portion of titanic anatomy to shaft? Did he think he was helping? "
        'Can we infer that "Valence was helping"? Yes, No, or Maybe?\n'
    )
    assert p.candidates == ("Yes", "No", "Maybe") and p.gold == 1  # contradiction -> No


def test_wic(pools):
    p = render("wic", pools("wic").test[0])
    assert p.text == (
        'Does the word "class" have the same meaning in these two sentences? Yes, No?\n'
        "An emerging professional class.\n"
        "Apologizing for losing your temper, even though you were badly provoked, showed real class.\n"
    )
    assert p.candidates == ("No", "Yes") and p.gold == 0


def test_wsc(pools):
    p = render("wsc", pools("wsc").train[0])
    assert p.text == (
        "Mark told Pete many lies about himself, which Pete included in his book. "
        "He should have been more skeptical.\n"
        'In the previous sentence, does the pronoun "he" refer to Mark? Yes or No?\n'
    )
    assert p.candidates == ("No", "Yes") and p.gold == 0


def test_copa(pools):
    effect = render("copa", pools("copa").test[0])
    assert effect.text == "The man turned on the faucet so"
    assert effect.candidates == (" the toilet filled with water.", " water flowed from the spout.")
    assert effect.gold == 1 and effect.target == " water flowed from the spout."
    cause = render("copa", Example("x", {"premise": "I was tired.", "choice1": "I ran.",
                                          "choice2": "The Dog barked.", "question": "cause"}, label=0))
    assert cause.text == "I was tired because"
    assert cause.candidates == (" I ran.", " the Dog barked.")  # "I" keeps its capital


def test_boolq():
    ex = Example("x", {"passage": "Cats -- Cats are mammals.", "question": "are cats mammals"}, label=1)
    p = render("boolq", ex)
    assert p.text == "Cats -- Cats are mammals. Are cats mammals?\n"
    assert p.candidates == ("No", "Yes") and p.target == "Yes"


def test_multirc():
    ex = Example("x", {"paragraph": "Sky is blue.", "question": "What color?", "answer": "Blue"}, label=1)
    p = render("multirc", ex)
    assert p.text == ('Sky is blue.\nQuestion: What color?\n'
                      'I found this answer "Blue". Is that correct? Yes or No?\n')
    assert p.candidates == ("No", "Yes") and p.gold == 1


def test_record():
    ex = Example("x", {"passage": "Ann met Bob.\n@highlight\nAnn and Bob met",
                       "query": "@placeholder smiled.", "entities": ("Ann", "Bob")},
                 label=1, answers=("Bob",))
    p = render("record", ex)
    assert p.text == "Ann met Bob.\n- Ann and Bob met\n-"
    assert p.candidates == (" Ann smiled.", " Bob smiled.") and p.target == " Bob smiled."


def test_record_every_gold_entity_is_right():
    # ReCoRD golds are often two strings of one entity ("Benazir Bhutto", "Bhutto"): MeZO (whose templates and
    # scoring the paper uses) counts a prediction of either as right; the first is the target trained on.
    ex = Example("x", {"passage": "Ann met Bob Lee.", "query": "@placeholder smiled.",
                       "entities": ("Ann", "Bob Lee", "Lee")}, label=1, answers=("Bob Lee", "Lee"))
    p = render("record", ex)
    assert p.gold == 1 and p.golds == (1, 2) and p.right == (1, 2) and p.target == " Bob Lee smiled."
    record = get_task("record")
    assert record.score([2, 1, 0], [p, p, p]) == pytest.approx(2 / 3)
    plain = render("rte", Example("r", {"premise": "P.", "hypothesis": "H."}, label=1))
    assert plain.golds == () and plain.right == (1,)


def test_record_real_alternative_golds_score_right(pools):
    prompts = [render("record", ex) for ex in pools("record").test]
    several = [p for p in prompts if len(p.right) > 1]
    assert len(several) == 13  # of the 32 dev32 queries
    other = [next(k for k in p.right if k != p.gold) for p in several]
    assert get_task("record").score(other, several) == 1.0


def test_record_real_gold(pools):
    p = render("record", pools("record").train[0])
    assert p.target == (" Speaking after the game, Mourinho said: 'The important thing is to give "
                        "competition to the players, the best thing was that Olimpija Ljubljana made "
                        "it difficult.")
    assert "@highlight" not in p.text and p.text.endswith("\n-")


def test_squad(pools):
    p = render("squad", Example("q1", {"title": "T", "context": "C.", "question": " Who? "},
                                answers=("Ann", "ann")))
    assert p.text == "Title: T\nContext: C.\nQuestion: Who?\nAnswer:"
    assert p.target == " Ann\n" and p.answers == ("Ann", "ann") and p.candidates == ()
    real = render("squad", pools("squad").test[0])
    assert real.text.startswith("Title: Super_Bowl_50\nContext: Super Bowl 50 was")
    assert real.text.endswith("\nQuestion: Which NFL team represented the AFC at Super Bowl 50?\nAnswer:")


def test_drop():
    p = render("drop", Example("d", {"passage": "P.", "question": "How many?"}, answers=("3",)))
    assert p.text == "Passage: P.\nQuestion: How many?\nAnswer:"
    assert p.target == " 3\n" and p.gold is None


@pytest.mark.parametrize("name", TASK_NAMES)
def test_every_sampled_example_renders(pools, name):
    p = pools(name)
    rows = (p.train[:300] + (p.test or [])[:300])
    for ex in rows:
        pr = render(name, ex)
        if get_task(name).kind == "generation":
            assert pr.target.endswith("\n") and pr.answers
        else:
            assert pr.target == pr.candidates[pr.gold] and len(set(pr.candidates)) == len(pr.candidates)


def test_bad_label_is_a_clear_error():
    with pytest.raises(ValueError, match="not an index"):
        render("rte", Example("x", {"premise": "a", "hypothesis": "b"}, label=5))
    with pytest.raises(ValueError, match="no gold answer"):
        render("squad", Example("x", {"title": "", "context": "", "question": ""}))
