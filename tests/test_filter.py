"""Filter stages on hand-made and real pairs; near-dedupe with a deterministic n-gram embedder."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import msgspec
import numpy as np
import pytest

from services import filter as F
from services.collector import pairs_from_point
from shared.messages import MemoryPoint, Pair
from shared.settings import Settings

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CFG = F.FilterConfig()


def pair(prompt: str, completion: str, pid: int = 1, turn: int = 0) -> Pair:
    return Pair(prompt=prompt, completion=completion, point_id=pid, turn=turn)


def real_points() -> list[tuple[dict, MemoryPoint]]:
    out = []
    for name in ("kdconv", "multiwoz"):
        for line in (DATA / f"{name}.memory.jsonl").read_text(encoding="utf-8").splitlines():
            out.append((json.loads(line), msgspec.json.decode(line, type=MemoryPoint)))
    return out


@pytest.fixture(scope="module")
def points() -> list[tuple[dict, MemoryPoint]]:
    return real_points()


@pytest.fixture(scope="module")
def real_pairs(points) -> list[Pair]:
    return [x for _, p in points for x in pairs_from_point(p)]


class NgramEmbedder:
    """Deterministic stand-in for the real embedder: hashed character trigrams, L2-normalized."""

    def __init__(self, dim: int = 512) -> None:
        self.dim = dim
        self.calls: list[int] = []

    async def embed(self, texts: list[str]) -> np.ndarray:
        self.calls.append(len(texts))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            t = f"  {F.normalize(text)}  "
            for j in range(len(t) - 2):
                h = int.from_bytes(hashlib.blake2b(t[j : j + 3].encode(), digest_size=4).digest())
                out[i, h % self.dim] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms > 0, norms, 1.0)


# --- low value ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "completion", "reason"),
    [
        ("好的，谢谢。", "不客气。", "low_value:filler_reply"),
        ("这部电影怎么样？", "嗯嗯，哈哈！", "low_value:filler_reply"),
        ("Thank you , Goodbye", "You 're welcome . Have a great day !", "low_value:filler_reply"),
        ("can you help?", "ok", "low_value:filler_reply"),
        ("can you help?", "👍🙂!!", "low_value:filler_reply"),
        ("can you help?", "……", "low_value:filler_reply"),
        (
            "Thanks , bye .",
            "The train leaves at 05:39 from platform 2 .",
            "low_value:filler_prompt",
        ),
        ("谢谢", "它是2016年发行的专辑。", "low_value:filler_prompt"),
        ("Is it cheap ?", "Yes .", "low_value:filler_reply"),
        ("Which one ?", "It is .", "low_value:short_reply"),
        ("你听的是谁唱的？", "程璧。", "low_value:short_reply"),
        ("   ", "something", "low_value:empty"),
    ],
)
def test_low_value(prompt: str, completion: str, reason: str) -> None:
    assert F.low_value_reason(pair(prompt, completion), CFG) == reason


@pytest.mark.parametrize(
    ("prompt", "completion"),
    [
        ("门票多少钱？", "90元。"),  # short but a fact; digits count
        ("How long is the ride ?", "88 minutes ."),
        ("Do you want to book it ?", "Yes , for 5 people on saturday ."),
        ("好的，那它是哪年上映的？", "1993年11月30日。"),
        ("Any thoughts ?", "Okay, the booking is confirmed for Friday."),  # filler word + content
    ],
)
def test_substantive_pairs_are_kept(prompt: str, completion: str) -> None:
    assert F.low_value_reason(pair(prompt, completion), CFG) is None


def test_short_reply_minimum_is_configurable() -> None:
    p = pair("门票多少钱？", "90元。")
    assert F.low_value_reason(p, F.FilterConfig(min_reply_chars_zh=4)) == "low_value:short_reply"
    s = Settings(extra={"min_reply_chars_en": "20"})
    assert F.FilterConfig.from_settings(s).min_reply_chars_en == 20
    assert F.low_value_reason(pair("time?", "88 minutes ."), F.FilterConfig.from_settings(s))


def test_filler_matching_is_on_whole_words() -> None:
    assert not F.is_filler("book")  # contains "ok"
    assert not F.is_filler("notice")  # starts with "no"
    assert F.is_filler("No that is all thank you so much")


# --- sensitive ----------------------------------------------------------------------------------

VALID_ID = "11010519491231002X"  # the check digit of 1101051949123100 2 is X


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("my card is 4111 1111 1111 1111 thanks", "sensitive:card_number"),
        ("卡号4111-1111-1111-1111，有效期", "sensitive:card_number"),
        ("amex 378282246310005", "sensitive:card_number"),
        ("pay with 5555555555554444 2027", "sensitive:card_number"),
        ("card 4111 1111 1111 1111 2027 expires", "sensitive:card_number"),
        ("４１１１１１１１１１１１１１１１", "sensitive:card_number"),  # full-width digits
        (f"我的身份证是{VALID_ID}", "sensitive:id_number"),
        (f"id {VALID_ID.lower()}", "sensitive:id_number"),
        ("key sk-proj-Ab3dEf6hIj9kLmN0pQrStUvWxYz12345", "sensitive:api_key"),
        ("sk-ant-api03-AbCdEf0123456789GhIjKlMnOpQrSt-uvwxyz", "sensitive:api_key"),
        ("token ghp_1234567890abcdefghijABCDEFGHIJ123456", "sensitive:api_key"),
        ("github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz", "sensitive:api_key"),
        ("AKIAIOSFODNN7EXAMPLE is my key id", "sensitive:api_key"),
        ("slack xoxb-123456789012-abcdefGHIJ", "sensitive:api_key"),
        ("AIzaSyA1234567890abcdefghijklmnopqrstuv", "sensitive:api_key"),
        ("sk_live_4eC39HqLyjWDarjtT1zdp7dc", "sensitive:api_key"),
        (
            "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0"
            ".dozjgNryP4J3jVmNHl0w5N_XgL0n3I9",
            "sensitive:api_key",
        ),
        ("-----BEGIN RSA PRIVATE KEY-----\nMIIEow...", "sensitive:private_key"),
        ("-----BEGIN OPENSSH PRIVATE KEY-----", "sensitive:private_key"),
        ("wifi password: hunter2", "sensitive:password"),
        ("passwd=s3cret!", "sensitive:password"),
        ("我的密码是abc123", "sensitive:password"),
        ("密码：abc123", "sensitive:password"),
        ("I forgot my password again", "sensitive:keyword"),
        ("身份证号 110105194912310021", "sensitive:keyword"),  # fails the check, but labelled
        ("信用卡 4111 1111 1111 1112", "sensitive:keyword"),
    ],
)
def test_sensitive_detected_with_reason(text: str, reason: str) -> None:
    assert F.sensitive_reason_text(text) == reason
    assert F.sensitive_reason(pair("hi there friend", text)) == reason
    assert F.sensitive_reason(pair(text, "a fine answer")) == reason


@pytest.mark.parametrize(
    "text",
    [
        "phone number 01223902091 , postcode cb11bg",
        "Reference number is : H58I0WC3 .",
        "电话是010-65116400，也可以打13812345678",
        "order 4111 1111 1111 1112 shipped",  # fails Luhn
        "tracking 1234567812345670",  # passes Luhn but no card network starts with 1
        "110105194912310021 is a parcel code",  # 18 digits, wrong check digit
        "11010519491331002X",  # check digit computed for a 13th month would still fail
        "ask the skeleton sk-learn-tutorial-for-beginners-guide",  # prose, not a key
        "博物馆凭身份证免费入馆",  # the word alone, no number
        "we accept credit card payments",
        "timestamp 20250303072252",
    ],
)
def test_ordinary_numbers_and_words_stay(text: str) -> None:
    assert F.sensitive_reason_text(text) is None


def test_validators() -> None:
    assert F.luhn_ok("4111111111111111") and not F.luhn_ok("4111111111111112")
    assert F.is_prc_id(VALID_ID)
    assert not F.is_prc_id(VALID_ID[:-1] + "1")
    assert not F.is_prc_id("110105194902300027")  # 30 February


def test_no_real_pair_is_sensitive_and_phone_numbers_stay(points, real_pairs) -> None:
    """The datasets hold phones, booking codes and postcodes but no secrets: nothing is dropped."""
    kept, st = F._drop_stage("sensitive", real_pairs, F.sensitive_reason)
    assert st.dropped == {} and kept == real_pairs  # the very same objects, text unchanged
    phone = re.compile(r"(?<!\d)(?:0\d{2,3}-?\d{7,8}|1[3-9]\d{9}|01223\s?\d{6})(?!\d)")
    with_phone = [p for p in real_pairs if phone.search(p.prompt + "\n" + p.completion)]
    assert len({p.point_id for p in with_phone if p.point_id < 300000}) > 50  # kdconv
    assert len({p.point_id for p in with_phone if p.point_id > 300000}) > 200  # multiwoz
    out, _ = F.filter_sync(with_phone, CFG)
    assert all(p in with_phone for p in out)
    assert out and F.sensitive_reason(out[0]) is None


@pytest.mark.parametrize(
    ("secret", "reason"),
    [
        ("5105 1051 0510 5100", "sensitive:card_number"),
        (VALID_ID, "sensitive:id_number"),
        ("sk-" + "Ab1" * 16, "sensitive:api_key"),
        ("password: correct-horse", "sensitive:password"),
    ],
)
def test_secrets_planted_in_real_pairs_are_dropped(real_pairs, secret: str, reason: str) -> None:
    sample = real_pairs[::97]
    planted = [
        msgspec.structs.replace(p, completion=f"{p.completion} {secret}") if i % 2 else p
        for i, p in enumerate(sample)
    ]
    kept, st = F._drop_stage("sensitive", planted, F.sensitive_reason)
    assert st.dropped == {reason: len(sample) // 2}
    assert kept == sample[::2]


# --- exact dedupe -------------------------------------------------------------------------------


def test_normalization_key() -> None:
    a = pair("Ｈｅｌｌｏ,  World!", "  好的 。 明天见")
    b = pair("helloworld", "好的明天见")
    c = pair("hello world", "好的，明天见")
    assert F.dedupe_key(a) == F.dedupe_key(c) == ("hello world", "好的明天见")
    assert F.dedupe_key(b) != F.dedupe_key(c)  # Latin word boundaries count
    assert F.normalize("Booking 2 , ref: X1") == "booking 2 ref x1"
    kept, n = F.dedupe_exact([a, c, pair("hello world", "another")])
    assert n == 1 and kept[0] is a


def test_exact_duplicate_points_are_removed(points, real_pairs) -> None:
    dup_ids = {raw["id"] for raw, _ in points if raw["meta"]["duplicate_kind"] == "exact"}
    assert len(dup_ids) >= 50
    kept, stages = F.filter_sync(real_pairs, CFG)
    assert not {p.point_id for p in kept} & dup_ids
    after_stage2 = stages[1].count_out
    dup_pairs_reaching_dedupe = [
        p
        for p in real_pairs
        if p.point_id in dup_ids
        and F.low_value_reason(p, CFG) is None
        and F.sensitive_reason(p) is None
    ]
    exact = stages[2]
    assert exact.stage == "exact_dedupe" and exact.count_in == after_stage2
    assert exact.dropped["duplicate:exact"] >= len(dup_pairs_reaching_dedupe) > 100


# --- near dedupe --------------------------------------------------------------------------------


def brute_force_mask(v: np.ndarray, lengths: list[int], threshold: float) -> np.ndarray:
    order = sorted(range(len(v)), key=lambda i: (-lengths[i], i))
    kept: list[int] = []
    for i in order:
        if all(float(v[i] @ v[j]) < threshold for j in kept):
            kept.append(i)
    mask = np.zeros(len(v), dtype=bool)
    mask[kept] = True
    return mask


@pytest.mark.parametrize("block", [1, 3, 64, 512])
def test_near_duplicate_mask_matches_greedy_reference(block: int) -> None:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(15, 32))
    v = np.repeat(centers, 4, axis=0) + rng.normal(scale=0.15, size=(60, 32))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    lengths = [int(x) for x in rng.integers(1, 40, size=60)]
    got = F.near_duplicate_mask(v, lengths, 0.9, block=block)
    assert (got == brute_force_mask(v, lengths, 0.9)).all()
    assert 15 <= got.sum() < 60


def test_near_duplicate_mask_keeps_longest_of_a_group() -> None:
    v = np.array([[1, 0, 0], [0.99, 0.14, 0], [0, 1, 0], [0.995, 0, 0.1]], dtype=np.float32)
    mask = F.near_duplicate_mask(v, [10, 30, 5, 20], 0.9)
    assert mask.tolist() == [False, True, True, False]
    assert F.near_duplicate_mask(np.zeros((0, 3)), [], 0.9).shape == (0,)


async def test_dedupe_near_embeds_once_and_keeps_longer_completion() -> None:
    pairs = [
        pair("Where is the museum ?", "It is on Trumpington Street .", 1),
        pair("I need a cheap hotel in the north .", "There are 2 guesthouses .", 2),
        pair(
            "Where is the museum ?",
            "It is on Trumpington Street , near the centre .",
            3,
        ),
        pair("你喜欢哪部电影？", "我最喜欢辛德勒的名单。", 4),
    ]
    emb = NgramEmbedder()
    kept, n = await F.dedupe_near(pairs, emb, 0.8)
    assert emb.calls == [4]
    assert n == 1 and [p.point_id for p in kept] == [2, 3, 4]


# --- quality, truncation, pipeline ----------------------------------------------------------------


def test_quality_score_prefers_informative_well_formed_replies() -> None:
    good = pair(
        "你知道连姆·尼森获得过什么奖吗？",
        "他获得过第53届威尼斯国际电影节最佳男演员奖，还在2002年获英女王颁发OBE杰出勋章。",
    )
    short = pair("你知道连姆·尼森获得过什么奖吗？", "知道呀。")
    repetitive = pair("你知道连姆·尼森获得过什么奖吗？", "哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈")
    vague_prompt = pair("嗯", good.completion)
    symbols = pair("What is the reference ?", "### ---- *** ==== @@@@ !!!! ???")
    s = F.quality_score
    assert s(good) > s(short) and s(good) > s(repetitive) and s(good) > s(vague_prompt)
    assert s(pair("What is the reference ?", "The reference number is H58I0WC3 .")) > s(symbols)
    assert all(0.0 <= s(p) <= 1.0 for p in (good, short, repetitive, vague_prompt, symbols))


def test_cap_keeps_best_in_original_order() -> None:
    pairs = [
        pair("q?", "ok."),
        pair("Where can I find a good hotel in the centre ?", "The Gonville Hotel is central ."),
        pair("x", "y"),
        pair(
            "你知道它是哪年上映的吗？", "是在1993年11月30日上映的，当年就拿下了七项奥斯卡金像奖。"
        ),
    ]
    kept, n = F.cap_by_quality(pairs, 2)
    assert n == 2 and kept == [pairs[1], pairs[3]]


def test_truncation_is_on_characters() -> None:
    text = "雍和宫是北京市内最大的藏传佛教寺院" * 10
    assert F.truncate_chars(text, 7) == "雍和宫是北京市"
    assert F.truncate_chars("cafe\u0301s", 4) == "caf"  # the accent stays with its e
    assert F.truncate_chars("short", 10) == "short"


async def test_run_filter_on_real_data(real_pairs) -> None:
    settings = Settings(max_pairs=500, max_chars=60)
    emb = NgramEmbedder()
    result = await F.run_filter(real_pairs, settings, emb)
    names = [s.stage for s in result.stages]
    assert names == [
        "low_value",
        "sensitive",
        "exact_dedupe",
        "near_dedupe",
        "quality_cap",
        "truncate",
    ]
    assert result.stages[0].count_in == len(real_pairs)
    for a, b in zip(result.stages, result.stages[1:], strict=False):
        assert a.count_out == b.count_in
    for st in result.stages:
        assert st.count_in - st.count_out == sum(st.dropped.values())
    assert len(result.kept) == 500 == result.stages[-1].count_out
    assert result.truncated > 0
    assert all(len(p.prompt) <= 60 and len(p.completion) <= 60 for p in result.kept)
    assert result.stages[3].dropped.get("duplicate:near", 0) > 0
    assert len(emb.calls) == 1
    assert sum(result.dropped.values()) == len(real_pairs) - 500
    json.dumps(result.report(), ensure_ascii=False)  # goes into the run report as is
    # without an embedder the stage is recorded and drops nothing
    plain = await F.run_filter(real_pairs[:200], Settings(), None)
    assert plain.stages[3].dropped == {}


def test_chinese_share_counts_the_points_that_are_mostly_chinese() -> None:
    assert F.chinese_share([]) is None
    texts = ["用户: 你听过这首歌吗？\n助手: 听过，很好听。", "User: hi\nAssistant: hi", "OK 好的"]
    assert F.chinese_share(texts) == pytest.approx(2 / 3)
    kdconv = [json.loads(line)["content"] for line in (DATA / "kdconv.memory.jsonl").open()]
    multiwoz = [json.loads(line)["content"] for line in (DATA / "multiwoz.memory.jsonl").open()]
    assert F.chinese_share(kdconv) > 0.99 and F.chinese_share(multiwoz) == 0.0
