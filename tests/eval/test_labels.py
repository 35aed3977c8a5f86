"""Spec labels of reports and plots: method and budget of a spec, and names that tell same-named methods apart."""

from __future__ import annotations

from longctx.eval.labels import label_specs, spec_label


def test_spec_labels_parse_method_and_budget() -> None:
    assert (spec_label("full").method, spec_label("full").budget) == ("full", "all")
    lab = spec_label("snapkv:512")
    assert (lab.method, lab.budget, lab.budget_tokens) == ("snapkv", "512", 512)
    lab = spec_label("streamingllm:0.25 int8")
    assert (lab.method, lab.budget, lab.budget_fraction) == ("streamingllm+int8", "25%", 0.25)
    labels = label_specs([str(spec_label(s).spec) for s in ("snapkv:64", "retain=snapkv(window=8) budget=uniform("
                                                                           "tokens=64)")])
    assert len({lab.method for lab in labels.values()}) == 2  # same short name, different methods: disambiguated
    assert sorted(lab.method for lab in labels.values()) == ["snapkv(window=32)", "snapkv(window=8)"]


def test_head_split_budgets_are_labelled_by_what_differs() -> None:
    specs = [str(spec_label(s).spec) for s in ("budget=duo(heads=/x/duo_a.json)",
                                               "budget=duo(heads=/x/duo_a.json,retrieval=0.25)",
                                               "budget=duo(heads=/y/probe.json,retrieval=0.25)")]
    labels = label_specs(specs)
    assert [labels[s].method for s in specs] == ["duo(heads=duo_a, retrieval=0)", "duo(heads=duo_a, retrieval=0.25)",
                                                 "duo(heads=probe, retrieval=0.25)"]
    assert {labels[s].budget for s in specs} == {"per head"}
    assert label_specs(specs[:1])[specs[0]].method == "duo"  # alone: the short name


def test_labels_that_would_coincide_fall_back_to_the_canonical_form() -> None:
    specs = [str(spec_label(s).spec) for s in ("budget=duo(heads=/x/duo_a.json)", "budget=duo(heads=/y/duo_a.json)")]
    labels = label_specs(specs)
    assert labels[specs[0]].method != labels[specs[1]].method
    assert "/x/duo_a.json" in labels[specs[0]].method and "/y/duo_a.json" in labels[specs[1]].method
