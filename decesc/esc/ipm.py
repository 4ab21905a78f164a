"""Inferential Preference Mining (IPM): preference pairs from the SFT models' own mistakes.

The SFT models are run on TRAINING contexts and every error they make becomes a DPO pair whose
chosen side is the gold annotation (the paper's "IPM-PrefDial"):

- Strategy Planner: each predicted strategy that differs from the gold one is a Strategy
  Mismatch -> SP pair (context, chosen = gold strategy, rejected = predicted strategy).
- Response Generator: k sampled replies per context, generated with the GOLD strategy, are
  judged; each gets ONE label (one of the five error types or "No Error", as the paper's judge
  gives: :mod:`decesc.esc.judges.base`). A reply labelled Lack of Empathy, Early Emotion Shift
  or Template Response -> RG pair (context + strategy, chosen = gold reply, rejected = sampled
  reply, error_types = [its label]). This is the paper's dynamic data routing. A reply labelled
  Strategy Mismatch is NOT routed to the RG data: the generator was given the gold strategy,
  and strategy-level pairs come from the planner itself. Emotion Misread is reported in the
  error analysis only, as in the paper; No Error gives no pair.
- Vanilla (joint) model, for the Table 5 ablations: sampled "[Strategy] reply" outputs are
  labelled by P/N (positive/negative) for the strategy (s: equal to gold?) and the response
  (r: is its judged label none of the three routed error types?): PsPr samples are good and give
  no pair; PsNr, NsPr and NsNr give pairs whose chosen side is the gold "[Strategy] reply"
  (which is PsPr). An unreadable strategy tag counts as Ns.

Rejected texts identical to the chosen text are dropped, and so are duplicate rejected texts for
the same context.

Length. A reply generated with at most ``max_new_tokens`` tokens can take MORE tokens once its
text is encoded again (decode -> encode is not length-preserving: a byte-level model may emit a
partial UTF-8 character that decodes to U+FFFD, or tokens the tokenizer would merge differently).
:func:`fit_pairs` cuts each rejected reply to the longest prefix whose re-encoded pair fits
``max_seq_len``, so a mined pair never exceeds the DPO budget.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from decesc.core.tokenizer import Tokenizer, chat_messages
from decesc.esc.prompts import TASKS, Example, format_vanilla_target
from decesc.formats.records import PreferencePair

STRATEGY_MISMATCH = "Strategy Mismatch"
RG_ROUTED = ("Lack of Empathy", "Early Emotion Shift", "Template Response")
VANILLA_CATEGORIES = ("NsNr", "PsNr", "NsPr")  # in the order of the paper's Table 5


@dataclass
class Candidate:
    """One SFT output to route: a planned strategy or a sampled reply, with its judged label."""

    example: Example  # the context it was produced for (task "sp", "rg" or "vanilla")
    output: str  # predicted strategy name, or reply text, or raw "[Strategy] reply" text
    label: str | None = None  # the judge's one label (replies; LABELS of decesc.esc.judges);
    # planner outputs are not judged: their Strategy Mismatch is computed here
    strategy: str | None = None  # vanilla: the strategy parsed from the output (None = unreadable)


def _pair(ex: Example, rejected: str, errors, source: str, chosen: str | None = None,
          category: str | None = None) -> PreferencePair:
    return PreferencePair(ex.prompt, chosen if chosen is not None else ex.target, rejected, ex.system,
                          task=ex.task, strategy=ex.strategy, error_types=list(errors),
                          category=category, source_model=source, dialogue=ex.dialogue, turn=ex.turn)


def route(candidates: list[Candidate], source_model: str = "") -> dict[str, list[PreferencePair]]:
    """Dynamic data routing: each candidate becomes at most one pair in the right dataset.

    Returns {"sp": [...], "rg": [...], "vanilla": [...]} (see the module docstring for the rules).
    """
    out: dict[str, list[PreferencePair]] = {task: [] for task in TASKS}
    seen: set[tuple] = set()
    for c in candidates:
        ex, text = c.example, c.output.strip()
        key = (ex.task, ex.dialogue, ex.turn, ex.prompt, text)
        if key in seen:
            continue
        seen.add(key)
        if ex.task == "sp":
            if text != ex.strategy:
                out["sp"].append(_pair(ex, text, [STRATEGY_MISMATCH], source_model))
        elif ex.task == "rg":
            if c.label in RG_ROUTED and text != ex.response.strip():
                out["rg"].append(_pair(ex, text, [c.label], source_model))
        elif ex.task == "vanilla":
            s_ok = c.strategy == ex.strategy
            r_bad = [c.label] if c.label in RG_ROUTED else []
            if s_ok and not r_bad:
                continue  # PsPr: a good sample
            category = ("P" if s_ok else "N") + "s" + ("N" if r_bad else "P") + "r"
            errors = ([] if s_ok else [STRATEGY_MISMATCH]) + r_bad
            chosen = format_vanilla_target(ex.strategy, ex.response)
            if text != chosen:
                out["vanilla"].append(_pair(ex, text, errors, source_model, chosen, category))
        else:
            raise ValueError(f"unknown task {ex.task!r} in a mining candidate")
    return out


def statistics(pairs: list[PreferencePair]) -> dict:
    """Table-1-style statistics of a pair set: counts by error type / category, text lengths."""
    n = len(pairs)
    by_error: dict[str, int] = {}
    by_category: dict[str, int] = {}
    for p in pairs:
        for e in p.error_types:
            by_error[e] = by_error.get(e, 0) + 1
        if p.category:
            by_category[p.category] = by_category.get(p.category, 0) + 1
    return {
        "pairs": n,
        "contexts": len({(p.dialogue, p.turn) for p in pairs}),
        "dialogues": len({p.dialogue for p in pairs}),
        "by_error_type": dict(sorted(by_error.items())),
        "by_category": dict(sorted(by_category.items())),
        "avg_chars_chosen": round(sum(len(p.chosen) for p in pairs) / n, 1) if n else 0.0,
        "avg_chars_rejected": round(sum(len(p.rejected) for p in pairs) / n, 1) if n else 0.0,
    }


def truncate_to_tokens(tokenizer: Tokenizer, text: str, n: int) -> str:
    """The longest token prefix of ``text`` that re-encodes to at most ``n`` tokens.

    A cut inside a multi-byte character decodes to U+FFFD (three bytes, so it may re-encode to
    more tokens than it replaced): that partial character is dropped. Should the decoded prefix
    still re-encode longer than ``n``, the cut moves back one token at a time until it fits.
    """
    ids = tokenizer.encode(text)
    if len(ids) <= n:
        return text
    for k in range(max(n, 0), -1, -1):
        cut = tokenizer.decode(ids[:k]).rstrip("\ufffd").rstrip()
        if len(tokenizer.encode(cut)) <= n:
            return cut
    return ""


def fit_pairs(pairs: list[PreferencePair], tokenizer: Tokenizer, max_seq_len: int,
              max_new_tokens: int) -> tuple[list[PreferencePair], dict]:
    """Pairs whose rejected side, re-encoded after the chat prompt with its end-of-turn token,
    fits ``max_seq_len`` (cut by :func:`truncate_to_tokens` where it does not).

    Returns (pairs, counts) with counts ``{"longer_than_max_new_tokens": n, "cut_to_fit": m}``:
    how many rejected replies re-encode to more than ``max_new_tokens`` tokens, and how many had
    to be cut (a cut that leaves nothing, or the chosen text, drops the pair). A pair whose prompt leaves no room at all is a ValueError (the pre-flight checks
    that every mined prompt leaves ``max_new_tokens``).
    """
    out, longer, cut = [], 0, 0
    for pair in pairs:
        prompt = len(tokenizer.apply_chat_template(chat_messages(pair.prompt, pair.system),
                                                   add_generation_prompt=True))
        room = max_seq_len - prompt - 1  # the end-of-turn token closes the reply
        tokens = len(tokenizer.encode(pair.rejected))
        longer += tokens > max_new_tokens
        if tokens > room:
            if room < 1:
                raise ValueError(f"dialogue {pair.dialogue}, turn {pair.turn}: the {pair.task} prompt "
                                 f"takes {prompt} tokens, no room left in max_seq_len {max_seq_len}; "
                                 "raise --max-seq-len")
            pair = replace(pair, rejected=truncate_to_tokens(tokenizer, pair.rejected, room))
            cut += 1
            if not pair.rejected.strip() or pair.rejected == pair.chosen:
                continue  # nothing left to prefer against
        out.append(pair)
    return out, {"longer_than_max_new_tokens": longer, "cut_to_fit": cut}
