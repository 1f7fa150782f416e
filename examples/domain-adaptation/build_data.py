"""Build data.jsonl (documents for continued pretraining) and questions.jsonl (multiple choice about them).

Run from the repository root:  python examples/domain-adaptation/build_data.py

The "internal documents" are two kinds of text a team has and a small model has rarely read closely:

- the Python standard library's docstrings for the modules in MODULES, one document per public function,
  class or method: `module.name(signature)` then its docstring (taken from this Python; they change between
  Python versions, so the builder insists on the version the bundled data was built with, PYTHON);
- this project's own documentation as of commit DOCS_COMMIT (README.md and the examples' READMEs, read with
  `git show`, one document per `##` section), so that editing the README does not change the recipe's data.

questions.jsonl asks, for QUESTIONS_PER_MODULE documented functions of each module, which function the
first sentence of its docstring describes, with three other functions of the same module as the wrong
choices (`document` names the start of the document that answers it, so the evaluation can tell questions
about documents it trained on from those about held-out ones); then the questions about this project written in PROJECT_QUESTIONS. Seeded, so rebuilding gives
the same bytes.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import random
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PYTHON = "3.11"
DOCS_COMMIT = "83f5a4e"
DOCS = ("README.md", "examples/bug-triage/README.md", "examples/support-routing/README.md")
MODULES = ("json", "textwrap", "shutil", "fnmatch", "glob", "difflib", "heapq", "bisect", "statistics",
           "secrets", "base64", "shlex", "string", "functools", "tempfile", "zipfile", "csv", "ipaddress")
QUESTIONS_PER_MODULE = 4
MAX_DOC_CHARS = 2000

PROJECT_QUESTIONS = [
    ("Which command runs specialist's test suite in its own environment?",
     ["make test", "make check", "tox -e py311", "python setup.py test"], 0),
    ("Which command runs specialist's main job on the embedded model?",
     ["make demo", "make run", "specialist start", "make train"], 0),
    ("What is specialist's embedded default base model?",
     ["Gemma 3 270M", "Llama 3 8B", "GPT-2 small", "Mistral 7B"], 0),
    ("Which method does specialist use by default to adapt the weights?",
     ["LoRA", "full fine-tuning", "prompt tuning", "distillation"], 0),
    ("Which three arms does a specialist evaluation compare?",
     ["base zero-shot, base few-shot and tuned", "train, validation and test", "fp32, bf16 and int8",
      "LoRA, DoRA and QLoRA"], 0),
    ("What does the bug-triage recipe predict for each Hadoop bug report?",
     ["its priority", "its assignee", "its fix version", "its duplicate"], 0),
    ("In the support-routing recipe, what does the router answer for an out-of-scope message?",
     ["escalate", "unknown", "other", "refund"], 0),
    ("Which data set provides the out-of-scope messages of the support-routing recipe?",
     ["clinc150", "banking77", "MMLU", "HumanEval"], 0),
    ("Which metric besides accuracy does the bug-triage recipe report because its classes are unbalanced?",
     ["macro-F1", "BLEU", "perplexity", "ROUGE-L"], 0),
    ("Which data set does the bug-triage recipe use?",
     ["GitBugs Hadoop", "clinc150", "loghub", "HumanEval"], 0),
]


def api_documents(module_name: str) -> list[dict[str, str]]:
    """One document per public function, class and method of `module_name` that has a docstring."""
    module = importlib.import_module(module_name)
    public = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
    documents = []
    for name in sorted(public):
        obj = getattr(module, name, None)
        if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
            continue
        if getattr(obj, "__module__", module_name) not in (module_name, f"_{module_name}"):
            continue  # re-exported from elsewhere
        documents += _documents_of(module_name, name, obj)
        if inspect.isclass(obj):
            for method_name, method in sorted(vars(obj).items()):
                if not method_name.startswith("_") and inspect.isfunction(method):
                    documents += _documents_of(module_name, f"{name}.{method_name}", method)
    return documents


def _documents_of(module_name: str, name: str, obj) -> list[dict[str, str]]:
    doc = inspect.getdoc(obj)
    if not doc or len(doc) < 40:
        return []
    try:
        signature = re.sub(r" at 0x[0-9a-f]+", "", str(inspect.signature(obj)))  # default reprs hold addresses
    except (TypeError, ValueError):
        signature = "(...)"
    head = f"{module_name}.{name}{signature}\n\n"
    parts, current = [], ""
    for paragraph in doc.split("\n\n"):  # long docstrings become several documents, split between paragraphs
        if current and len(head) + len(current) + len(paragraph) > MAX_DOC_CHARS:
            parts.append(current)
            current = ""
        current = f"{current}\n\n{paragraph}" if current else paragraph
    parts.append(current)
    return [{"text": head + part[: MAX_DOC_CHARS], "source": f"python-{PYTHON}:{module_name}.{name}",
             "first_sentence": first_sentence(doc), "name": name} for part in parts]


def first_sentence(doc: str) -> str:
    paragraph = doc.split("\n\n")[0].replace("\n", " ")
    return re.split(r"(?<=\.)\s", paragraph, maxsplit=1)[0].strip()


def project_documents(commit: str) -> list[dict[str, str]]:
    documents = []
    for path in DOCS:
        try:
            text = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=REPO, capture_output=True, text=True,
                                  check=True).stdout
        except (OSError, subprocess.CalledProcessError) as exc:
            print(f"cannot read {path} at commit {commit} (a git checkout with history is needed): {exc}",
                  file=sys.stderr)
            raise SystemExit(3) from exc
        for n, section in enumerate(re.split(r"\n(?=## )", text)):
            if section.strip():
                documents.append({"text": section.strip() + "\n", "source": f"specialist@{commit}:{path}#{n}"})
    return documents


def module_questions(documents: list[dict[str, str]], rng: random.Random) -> list[dict[str, object]]:
    questions = []
    for module_name in MODULES:
        functions = {}
        for d in documents:
            if d["source"].startswith(f"python-{PYTHON}:{module_name}.") and "." not in d["name"]:
                functions.setdefault(d["name"], d["first_sentence"])
        # a description shared by two names (aliases) cannot tell them apart
        counts = {s: list(functions.values()).count(s) for s in functions.values()}
        names = sorted(n for n, s in functions.items() if counts[s] == 1 and len(s) > 20)
        if len(names) < 4:
            continue
        for name in rng.sample(names, min(QUESTIONS_PER_MODULE, len(names))):
            wrong = rng.sample([n for n in names if n != name], 3)
            choices = [f"{module_name}.{n}" for n in [name, *wrong]]
            rng.shuffle(choices)
            questions.append({"question": f"Which function of Python's {module_name} module does this: "
                                          f"{functions[name]}", "choices": choices,
                              "answer": choices.index(f"{module_name}.{name}"),
                              "document": f"{module_name}.{name}("})
    return questions


def project_questions(rng: random.Random) -> list[dict[str, object]]:
    questions = []
    for question, choices, answer in PROJECT_QUESTIONS:
        order = list(range(len(choices)))
        rng.shuffle(order)
        questions.append({"question": question, "choices": [choices[i] for i in order], "answer": order.index(answer)})
    return questions


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} rows to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "data.jsonl")
    args = parser.parse_args()
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    if running != PYTHON:
        print(f"the bundled documents are Python {PYTHON}'s docstrings; this is Python {running}, whose differ",
              file=sys.stderr)
        raise SystemExit(3)
    rng = random.Random(args.seed)
    api = [d for m in MODULES for d in api_documents(m)]
    documents = api + project_documents(DOCS_COMMIT)
    write_jsonl(args.out, [{"text": d["text"], "source": d["source"]} for d in documents])
    write_jsonl(args.out.with_name("questions.jsonl"), module_questions(api, rng) + project_questions(rng))


if __name__ == "__main__":
    main()
