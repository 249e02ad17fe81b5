"""Filter: from raw pairs to a curated training set, every drop counted with a reason.

Stages, in order (each a pure function over a list of pairs):

1. `low_value`   filler exchanges ("好的" / "不客气", "thanks" / "bye"), replies that are only
                 punctuation/emoji, replies shorter than a language-aware minimum.
2. `sensitive`   secrets and identity numbers, found by validated detectors (Luhn-checked card
                 numbers, PRC ID numbers with a valid check digit and birth date, provider API
                 keys, JWTs, PEM private keys, "password: x" forms) and the original's keyword
                 list. Ordinary numbers (phones, bookings, digit strings failing the checks) stay.
3. `exact_dedupe` same (prompt, completion) after NFKC, case-fold, punctuation strip and
                 whitespace collapse; the first occurrence stays.
4. `near_dedupe` embedding cosine >= threshold; the longest completion of a group stays.
5. `quality_cap` at most `max_pairs`, the best by `quality_score`.
6. `truncate`    prompt/completion cut to `max_chars` characters (never bytes); drops nothing.

Secrets are detected before truncation, so a cut never hides half a key.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any, Protocol

import msgspec
import numpy as np

from shared.messages import FunnelStage, Pair
from shared.settings import Settings


class SupportsEmbed(Protocol):
    """What the filter needs of `shared.embeddings.Embedder`."""

    async def embed(self, texts: list[str]) -> np.ndarray: ...


class FilterResult(msgspec.Struct, kw_only=True):
    kept: list[Pair]
    stages: list[FunnelStage]
    truncated: int = 0  # pairs cut to max_chars but kept

    @property
    def dropped(self) -> dict[str, int]:
        """All drop reasons over all stages."""
        total: Counter[str] = Counter()
        for st in self.stages:
            total.update(st.dropped)
        return dict(total)

    def report(self) -> list[dict[str, Any]]:
        return [msgspec.to_builtins(st) for st in self.stages]


@dataclass(frozen=True)
class FilterConfig:
    """Knobs of the filter; `from_settings` reads them from Settings (extras by name)."""

    # shortest reply kept, in content characters (ideographs, letters, digits; no punctuation):
    # 3 already carry a fact in Chinese ("90元", "3小时"); English needs a couple of words
    min_reply_chars_zh: int = 3
    min_reply_chars_en: int = 6
    max_pairs: int = 1000
    max_chars: int = 2000
    dedupe_threshold: float = 0.9

    @classmethod
    def from_settings(cls, s: Settings) -> FilterConfig:
        return cls(
            min_reply_chars_zh=int(s.extra.get("min_reply_chars_zh", cls.min_reply_chars_zh)),
            min_reply_chars_en=int(s.extra.get("min_reply_chars_en", cls.min_reply_chars_en)),
            max_pairs=s.max_pairs,
            max_chars=s.max_chars,
            dedupe_threshold=s.dedupe_threshold,
        )


# --- text helpers -------------------------------------------------------------------------------

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]")
# a token is one CJK ideograph, or a run of other letters/digits (a Latin word, a number)
_TOKEN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]|[^\W_]+")
_SPACE = re.compile(r"\s+")


def _is_mark(ch: str) -> bool:
    """Punctuation, symbol (emoji included), separator, control or format character."""
    return unicodedata.category(ch)[0] in "PSZC"


_IDEO = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_CJK_GAP = re.compile(f"(?<=[{_IDEO}]) | (?=[{_IDEO}])")


def normalize(text: str) -> str:
    """The dedupe key: NFKC, case-fold, punctuation/symbols removed, whitespace collapsed.

    A removed mark leaves a space (so "a,b" is "a b", not "ab"); spaces next to an ideograph go,
    since Chinese does not separate words ("好的 。明天见" is "好的明天见").
    """
    t = unicodedata.normalize("NFKC", text).casefold()
    t = "".join(" " if _is_mark(ch) else ch for ch in t)
    t = _SPACE.sub(" ", t).strip()
    return _CJK_GAP.sub("", t)


def tokens(text: str) -> list[str]:
    """CJK ideographs one by one, other words whole; lower-cased, NFKC."""
    return _TOKEN.findall(unicodedata.normalize("NFKC", text).casefold())


def is_cjk_text(text: str) -> bool:
    """Mostly Chinese: ideographs at least half as many as other letters (digits are neutral)."""
    cjk = len(_CJK.findall(text))
    return cjk > 0 and cjk * 2 >= sum(ch.isalpha() for ch in text) - cjk


def chinese_share(texts: Iterable[str]) -> float | None:
    """The share of `texts` that are mostly Chinese (`is_cjk_text`); None when there are none."""
    flags = [is_cjk_text(t) for t in texts]
    return sum(flags) / len(flags) if flags else None


def content_chars(text: str) -> int:
    """Letters, digits and ideographs: what is left when punctuation, emoji and spaces go."""
    return sum(1 for ch in text if ch.isalnum())


# --- stage 1: low value -------------------------------------------------------------------------

# Filler utterances (the original's list, widened): a side made only of these carries nothing to
# learn. Matched on whole tokens, so "ok" never matches inside "book".
FILLERS_ZH = tuple(
    """
    好的 好 好吧 好滴 好嘞 行 行吧 可以 没问题 是的 是 对 对的 对啊 嗯 嗯嗯 恩 哦 噢
    喔 啊 呀 哈 哈哈 哈哈哈 呵呵 嘿嘿 嘻嘻 谢谢 谢谢你 谢谢您 多谢 感谢 非常感谢 谢啦
    不客气 不用谢 不用客气 客气 你客气了 没事 没关系 客气了 再见 拜拜 回见 晚安 早安
    你好 您好 在吗 收到 知道了 明白 明白了 了解 好的呢 不错 真棒 厉害 加油 辛苦了
    应该的 也 呢 吧 了 的 啦
    """.split()
)
FILLERS_EN = tuple(
    f.strip()
    for f in """
    ok|okay|k|kk|sure|yes|yeah|yep|yup|no|nope|nah|fine|great|cool|nice|good|alright|all right|right
    |got it|i see|sounds good|thanks|thank you|thank you so much|thank you very much|thanks a lot
    |thx|ty|many thanks|cheers|you're welcome|you are welcome|your welcome|welcome|no problem|np
    |no worries|my pleasure|bye|goodbye|good bye|bye bye|see you|see ya|later|good night|hi|hello
    |hey|hmm|hm|um|uh|oh|ah|wow|lol|haha|hahaha|ha|please|so|and|too|again|very|much|that's all
    |that is all|that will be all|have a nice day|have a great day|you too|same to you|for now
    |then|all|for|your help|the help|help
    """.split("|")
)
_FILLER_SEQS: frozenset[tuple[str, ...]] = frozenset(
    tuple(tokens(f)) for f in FILLERS_ZH + FILLERS_EN if tokens(f)
)
_FILLER_MAX = max(len(s) for s in _FILLER_SEQS)


def is_filler(text: str) -> bool:
    """True when `text` is empty, only punctuation/emoji, or only filler utterances."""
    toks = tokens(text)
    if not toks:
        return True
    # can toks be cut into filler sequences? (word-break DP, O(len * longest filler))
    ok = [False] * (len(toks) + 1)
    ok[0] = True
    for end in range(1, len(toks) + 1):
        for size in range(1, min(_FILLER_MAX, end) + 1):
            if ok[end - size] and tuple(toks[end - size : end]) in _FILLER_SEQS:
                ok[end] = True
                break
    return ok[-1]


def low_value_reason(pair: Pair, cfg: FilterConfig) -> str | None:
    if not pair.prompt.strip() or not pair.completion.strip():
        return "low_value:empty"
    if is_filler(pair.completion):
        return "low_value:filler_reply"
    if is_filler(pair.prompt):
        return "low_value:filler_prompt"
    minimum = cfg.min_reply_chars_zh if is_cjk_text(pair.completion) else cfg.min_reply_chars_en
    if content_chars(pair.completion) < minimum:
        return "low_value:short_reply"
    return None


# --- stage 2: sensitive data --------------------------------------------------------------------

# The original's keyword list, in two parts. Credential words drop the pair wherever they occur.
# Identity-document words drop it only with a number right after them ("身份证号 1101…"): a
# museum's "凭身份证入馆" (entry with ID card) is no secret, "my card number is 4…" is.
CREDENTIAL_KEYWORDS = (
    "password", "passwd", "passcode", "密码", "口令", "支付密码", "私钥", "private key",
    "secret key", "api key", "api_key", "apikey", "access token", "cvv", "cvc", "验证码", "安全码",
)  # fmt: skip
IDENTITY_KEYWORDS = (
    "身份证", "银行卡", "信用卡", "储蓄卡", "卡号", "护照号", "社保号", "credit card", "debit card",
    "bank card", "card number", "account number", "social security", "ssn", "passport number",
)  # fmt: skip
_CREDENTIAL = re.compile("|".join(re.escape(k) for k in CREDENTIAL_KEYWORDS), re.I)
_IDENTITY = re.compile(
    "(?:" + "|".join(re.escape(k) for k in IDENTITY_KEYWORDS) + r")"
    r"[^0-9\n]{0,12}[0-9][0-9 -]{4,}[0-9Xx]",
    re.I,
)

_API_KEYS = re.compile(
    r"""(?<![A-Za-z0-9_-])(?:
        sk-ant-[A-Za-z0-9_-]{20,}                       # Anthropic
      | sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}  # OpenAI
      | gh[pousr]_[A-Za-z0-9]{30,}                       # GitHub classic tokens
      | github_pat_[A-Za-z0-9_]{30,}                     # GitHub fine-grained
      | (?:AKIA|ASIA)[0-9A-Z]{16}                        # AWS access key id
      | xox[bpoas]-[A-Za-z0-9-]{10,}                     # Slack
      | AIza[0-9A-Za-z_-]{35}                            # Google
      | (?:sk|rk)_(?:live|test)_[0-9A-Za-z]{16,}         # Stripe
      | eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}  # JWT
    )""",
    re.X,
)
_PEM = re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")
_PASSWORD_FORM = re.compile(
    r"(?:\b(?:password|passwd|pwd|passcode|pass\s*phrase)\s*(?:is\s*|[:=：]\s*|is\s*[:=：]\s*)"
    r"(?!\s*(?:is|was|the|a|an|my|your|not)\b)\S"
    r"|(?:密码|口令|密碼)\s*(?:是|为|為|[:：=])\s*\S)",
    re.I,
)
# digit runs that may hold a card number: 13+ digits, single spaces/dashes between groups
_DIGIT_RUN = re.compile(r"(?<![0-9A-Za-z])[0-9]+(?:[ -][0-9]+)*(?![0-9A-Za-z])")
_ID_NUMBER = re.compile(r"(?<![0-9A-Za-z])[0-9]{17}[0-9Xx](?![0-9A-Za-z])")
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_prefix_ok(digits: str) -> bool:
    """Issuer ranges of the card networks (Amex/Diners/JCB 3, Visa 4, Mastercard 2/5, 6...)."""
    return digits[0] in "3456" or 22 <= int(digits[:2]) <= 27


def is_card_number(digits: str) -> bool:
    return 13 <= len(digits) <= 19 and _card_prefix_ok(digits) and luhn_ok(digits)


def find_card_number(text: str) -> str | None:
    """A Luhn-valid card number (13–19 digits, spaces/dashes allowed), or None.

    Inside a longer run of digit groups (a card followed by an expiry year, say) every window
    of whole groups is tried.
    """
    for m in _DIGIT_RUN.finditer(text):
        groups = re.split(r"[ -]", m.group())
        for i in range(len(groups)):
            digits = ""
            for g in groups[i:]:
                digits += g
                if len(digits) > 19:
                    break
                if is_card_number(digits):
                    return digits
    return None


def is_prc_id(s: str) -> bool:
    """18-char resident ID: region 11–82, a real birth date 1900..2099, ISO 7064 MOD 11-2."""
    if len(s) != 18 or not s[:17].isdigit() or s[17] not in "0123456789Xx":
        return False
    if not 11 <= int(s[:2]) <= 82:
        return False
    try:
        born = date(int(s[6:10]), int(s[10:12]), int(s[12:14]))
    except ValueError:
        return False
    if not 1900 <= born.year <= 2099:
        return False
    check = _ID_CHECK[sum(int(c) * w for c, w in zip(s[:17], _ID_WEIGHTS, strict=True)) % 11]
    return s[17].upper() == check


def _looks_random(token: str) -> bool:
    """A key body mixes letters and digits; prose like `sk-learn-tutorial` does not."""
    return any(c.isdigit() for c in token) and any(c.isalpha() for c in token)


def sensitive_reason_text(text: str) -> str | None:
    text = unicodedata.normalize("NFKC", text)  # full-width digits and letters count too
    if _PEM.search(text):
        return "sensitive:private_key"
    for m in _API_KEYS.finditer(text):
        if _looks_random(m.group()):
            return "sensitive:api_key"
    for m in _ID_NUMBER.finditer(text):
        if is_prc_id(m.group()):
            return "sensitive:id_number"
    if find_card_number(text):
        return "sensitive:card_number"
    if _PASSWORD_FORM.search(text):
        return "sensitive:password"
    if _CREDENTIAL.search(text) or _IDENTITY.search(text):
        return "sensitive:keyword"
    return None


def sensitive_reason(pair: Pair) -> str | None:
    return sensitive_reason_text(pair.prompt) or sensitive_reason_text(pair.completion)


# What every detector above needs somewhere in the NFKC text: a literal it starts with, or a
# run of 13+ digits. No token spans a line break, so a text without any also holds none in a
# piece made of its lines (a point's turns): one quick look at a whole point answers for all of
# its pairs, about 10x cheaper than the detectors on each pair.
_SENSITIVE_LITERALS = tuple(
    sorted(
        {
            "private key", "sk-", "sk_", "rk_", "github_pat_", "akia", "asia", "aiza", "eyj",
            "pass", "pwd", "密码", "口令", "密碼",  # pass: password, passwd, passcode, pass phrase
            *(k.lower() for k in CREDENTIAL_KEYWORDS + IDENTITY_KEYWORDS),
        }
    )
)  # fmt: skip
_SENSITIVE_SHAPES = re.compile(r"gh[pousr]_|xox[bpoas]-|[0-9](?:[ -]?[0-9]){12,}")
# Lower-casing as the detectors' re.I compares: it also equates İ and ı with i (NFKC already
# turns ſ into s and the Kelvin sign into K, the only other non-ASCII letters it equates).
_RE_I_FOLD = str.maketrans({"\u0130": "i", "\u0131": "i"})


def may_be_sensitive(text: str) -> bool:
    """False only when `sensitive_reason_text` finds nothing in `text`, nor in any of its
    pieces made of whole lines (a quick test before the detectors)."""
    if not unicodedata.is_normalized("NFKC", text):
        text = unicodedata.normalize("NFKC", text)
    folded = text.lower()
    if "\u0130" in text or "\u0131" in text:
        folded = text.translate(_RE_I_FOLD).lower()
    return _SENSITIVE_SHAPES.search(folded) is not None or any(
        k in folded for k in _SENSITIVE_LITERALS
    )


# --- stage 3: exact dedupe ----------------------------------------------------------------------


def dedupe_key(pair: Pair) -> tuple[str, str]:
    return normalize(pair.prompt), normalize(pair.completion)


def dedupe_exact(pairs: Sequence[Pair]) -> tuple[list[Pair], int]:
    seen: set[tuple[str, str]] = set()
    kept: list[Pair] = []
    for p in pairs:
        key = dedupe_key(p)
        if key not in seen:
            seen.add(key)
            kept.append(p)
    return kept, len(pairs) - len(kept)


# --- stage 4: near-duplicate dedupe -------------------------------------------------------------


def near_duplicate_mask(
    vectors: np.ndarray,
    lengths: Sequence[int] | np.ndarray,
    threshold: float = 0.9,
    *,
    block: int = 512,
) -> np.ndarray:
    """Boolean keep-mask: drop every row whose cosine to a kept, longer row is >= threshold.

    Rows are visited longest first (ties: lower index first) and a row is kept unless it is a
    near duplicate of a row already kept, so each group of near duplicates keeps its longest
    member. The work is matrix products: each block of rows against all kept rows at once, then a
    loop over the block's rows doing one vector comparison each (O(n) Python steps, not O(n²)).
    """
    v = np.asarray(vectors, dtype=np.float32)
    n = v.shape[0]
    if n == 0:
        return np.zeros(0, dtype=bool)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    v = v / np.where(norms > 0, norms, 1.0)
    lens = np.asarray(lengths, dtype=np.int64)
    order = np.lexsort((np.arange(n), -lens))  # longest first, stable
    vs = v[order]
    keep_sorted = np.zeros(n, dtype=bool)
    kept_rows = np.empty_like(vs)
    n_kept = 0
    for start in range(0, n, block):
        blk = vs[start : start + block]
        alive = np.ones(len(blk), dtype=bool)
        # against everything kept so far, in chunks so memory stays bounded
        for k0 in range(0, n_kept, 8192):
            sims = blk @ kept_rows[k0 : min(n_kept, k0 + 8192)].T
            alive &= ~(sims >= threshold).any(axis=1)
        # within the block, in order
        inner = (blk @ blk.T) >= threshold
        for i in range(len(blk)):
            if alive[i]:
                alive[i + 1 :] &= ~inner[i, i + 1 :]
        keep_sorted[start : start + len(blk)] = alive
        m = int(alive.sum())
        kept_rows[n_kept : n_kept + m] = blk[alive]
        n_kept += m
    mask = np.empty(n, dtype=bool)
    mask[order] = keep_sorted
    return mask


def embedding_text(pair: Pair) -> str:
    return f"{pair.prompt}\n{pair.completion}"


async def dedupe_near(
    pairs: Sequence[Pair], embedder: SupportsEmbed, threshold: float = 0.9
) -> tuple[list[Pair], int]:
    """Near-duplicate removal; prompt+completion embedded in one batched call."""
    if len(pairs) < 2:
        return list(pairs), 0
    vectors = await embedder.embed([embedding_text(p) for p in pairs])
    mask = near_duplicate_mask(vectors, [len(p.completion) for p in pairs], threshold)
    kept = [p for p, k in zip(pairs, mask, strict=True) if k]
    return kept, len(pairs) - len(kept)


# --- stage 5: quality score ---------------------------------------------------------------------

_SENTENCE_END = tuple("。！？!?.…~～)）」』\"”'’")


def _units(text: str) -> float:
    """Length in 'information units': an ideograph counts 1, a word of another script 1.5."""
    toks = tokens(text)
    cjk = sum(1 for t in toks if _CJK.fullmatch(t))
    return cjk + 1.5 * (len(toks) - cjk)


def quality_score(pair: Pair) -> float:
    """0..1; higher means a better example to learn from.

    0.40 * length   completion length is log-normal around 80 units (≈ 80 汉字 or 50 words):
                    one-liners and walls of text both score lower
    0.20 * prompt   the prompt is substantive: min(1, units / 8)
    0.25 * variety  distinct tokens / tokens of the completion (repetition such as
                    "哈哈哈哈" or copy-paste loops scores low)
    0.15 * form     the completion is mostly words (not symbols) and ends a sentence
    """
    c_units = _units(pair.completion)
    length = math.exp(-((math.log(max(c_units, 0.5)) - math.log(80.0)) ** 2) / 2.0)
    prompt = min(1.0, _units(pair.prompt) / 8.0)
    toks = tokens(pair.completion)
    variety = len(set(toks)) / len(toks) if len(toks) >= 4 else 0.5 if toks else 0.0
    visible = [ch for ch in pair.completion if not ch.isspace()]
    wordy = sum(ch.isalnum() for ch in visible) / len(visible) if visible else 0.0
    ends = 1.0 if pair.completion.rstrip().endswith(_SENTENCE_END) else 0.5
    form = min(1.0, wordy / 0.7) * ends
    return 0.40 * length + 0.20 * prompt + 0.25 * variety + 0.15 * form


def cap_by_quality(pairs: Sequence[Pair], max_pairs: int) -> tuple[list[Pair], int]:
    """The `max_pairs` best pairs, in their original order."""
    if len(pairs) <= max_pairs:
        return list(pairs), 0
    scores = np.array([quality_score(p) for p in pairs])
    best = np.argsort(-scores, kind="stable")[: max(0, max_pairs)]
    keep = sorted(int(i) for i in best)
    return [pairs[i] for i in keep], len(pairs) - len(keep)


# --- stage 6: truncation ------------------------------------------------------------------------


def truncate_chars(text: str, max_chars: int) -> str:
    """At most `max_chars` characters; never leaves a combining mark without its base."""
    if len(text) <= max_chars:
        return text
    cut = max_chars
    while cut > 0 and unicodedata.combining(text[cut]):
        cut -= 1
    return text[:cut].rstrip()


def truncate_pair(pair: Pair, max_chars: int) -> Pair:
    prompt = truncate_chars(pair.prompt, max_chars)
    completion = truncate_chars(pair.completion, max_chars)
    if prompt is pair.prompt and completion is pair.completion:
        return pair
    return msgspec.structs.replace(pair, prompt=prompt, completion=completion)


# --- the pipeline -------------------------------------------------------------------------------


def _drop_stage(
    name: str, pairs: Iterable[Pair], reason: Callable[[Pair], str | None]
) -> tuple[list[Pair], FunnelStage]:
    kept: list[Pair] = []
    dropped: Counter[str] = Counter()
    n = 0
    for p in pairs:
        n += 1
        r = reason(p)
        if r is None:
            kept.append(p)
        else:
            dropped[r] += 1
    return kept, FunnelStage(stage=name, count_in=n, count_out=len(kept), dropped=dict(dropped))


def filter_sync(pairs: Sequence[Pair], cfg: FilterConfig) -> tuple[list[Pair], list[FunnelStage]]:
    """Stages 1–3 (no embeddings)."""
    stages: list[FunnelStage] = []
    kept, st = _drop_stage("low_value", pairs, lambda p: low_value_reason(p, cfg))
    stages.append(st)
    kept, st = _drop_stage("sensitive", kept, sensitive_reason)
    stages.append(st)
    n_in = len(kept)
    kept, n = dedupe_exact(kept)
    stages.append(
        FunnelStage(
            stage="exact_dedupe",
            count_in=n_in,
            count_out=len(kept),
            dropped={"duplicate:exact": n} if n else {},
        )
    )
    return kept, stages


async def run_filter(
    pairs: Sequence[Pair],
    settings: Settings,
    embedder: SupportsEmbed | None,
    *,
    config: FilterConfig | None = None,
) -> FilterResult:
    """All stages; `embedder=None` skips near-duplicate removal (recorded as a 0-drop stage)."""
    cfg = config or FilterConfig.from_settings(settings)
    kept, stages = filter_sync(pairs, cfg)

    n_in = len(kept)
    if embedder is not None:
        kept, n = await dedupe_near(kept, embedder, cfg.dedupe_threshold)
    else:
        n = 0
    stages.append(
        FunnelStage(
            stage="near_dedupe",
            count_in=n_in,
            count_out=len(kept),
            dropped={"duplicate:near": n} if n else {},
        )
    )

    n_in = len(kept)
    kept, n = cap_by_quality(kept, cfg.max_pairs)
    stages.append(
        FunnelStage(
            stage="quality_cap",
            count_in=n_in,
            count_out=len(kept),
            dropped={"quality:over_max_pairs": n} if n else {},
        )
    )

    cut = [truncate_pair(p, cfg.max_chars) for p in kept]
    truncated = sum(1 for a, b in zip(kept, cut, strict=True) if a is not b)
    stages.append(FunnelStage(stage="truncate", count_in=len(kept), count_out=len(kept)))
    return FilterResult(kept=cut, stages=stages, truncated=truncated)
