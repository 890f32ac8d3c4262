"""Stage ``recaption``: prompts, the three backends, failure handling, emit policy, resume.

Models are tiny and random (built from configs in ``tiny_generators``), so the tests check
what the stage does with generations (which prompt each sample gets, where texts and errors
go, that nothing is dropped or overwritten, that the backends agree), not caption quality.
The ``openai`` backend talks to an OpenAI-compatible server on 127.0.0.1 serving the same
tiny models (``local_openai_server``).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import time
from collections import Counter
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import make_job, shared_path
from local_openai_server import LocalOpenAIServer
from tiny_generators import build_causal_lm, build_llava, build_vit_gpt2

from pairsift.pipeline.emit import CaptionPolicy
from pairsift.pipeline.errors import ConfigError, JobError
from pairsift.pipeline.stats import connect, stats_text
from pairsift.stages.recaption import recaption_summaries
from pairsift.pipeline.table import BASE_SCHEMA
from pairsift.stages.base import StageContext
from pairsift.stages.llm import GenRequest, prompts as P
from pairsift.stages.llm.openai_backend import OpenAIBackend
from pairsift.stages.llm.transformers_backend import TransformersBackend
from pairsift.stages.llm.vllm_backend import VllmBackend, build_requests, parse_outputs
from pairsift.stages.recaption import RecaptionConfig, RecaptionStage

pytest.importorskip("transformers")

NEW = 8  # max_new_tokens everywhere: the tests are about plumbing, not prose
EXAMPLES = [{"source": f"alt text {i}", "target": f"A rewritten caption number {i}."} for i in range(10)]


# -- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return str(build_causal_lm(tmp_path_factory.mktemp("tiny_lm")))


@pytest.fixture(scope="module")
def tiny_ved(tmp_path_factory):
    return str(build_vit_gpt2(tmp_path_factory.mktemp("tiny_ved")))


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    return str(build_llava(tmp_path_factory.mktemp("tiny_llava")))


@pytest.fixture(scope="module")
def lm_server(tiny_lm):
    """The tiny LM behind the chat and the completions API."""
    backends = {chat: TransformersBackend(tiny_lm, vision=False, max_new_tokens=NEW, chat=chat, batch_size=1)
                for chat in (True, False)}
    for b in backends.values():
        b.load()
    with LocalOpenAIServer(model="tiny-lm", backends=backends, slow_s=3.0) as server:
        yield server


@pytest.fixture(scope="module")
def photos():
    """Real photos from the sample pool (JPEG and PNG) and a GIF made from one of them."""
    from pairsift.samplepool import pool_samples

    samples = pool_samples()
    jpeg = next(d for _, d, _ in samples if d.startswith(b"\xff\xd8"))
    png = next(d for _, d, _ in samples if d.startswith(b"\x89PNG"))
    buf = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).convert("RGB").resize((40, 30)).save(buf, format="GIF")
    return {"jpeg": jpeg, "png": png, "gif": buf.getvalue()}


def _table(captions, images=None, dropped=(), **extra) -> pa.Table:
    rows = []
    for i, cap in enumerate(captions):
        img = images[i] if images is not None else b"\xff\xd8 not decoded in text modes"
        rows.append({"uid": f"uid{i:03d}", "key": str(i), "source": "00000.tar", "url": None, "caption": cap,
                     "image": None if i in dropped else img, "drop_reason": "too_small" if i in dropped else None,
                     "drop_stage": "quality" if i in dropped else None})
    table = pa.Table.from_pylist(rows, schema=BASE_SCHEMA)
    for name, values in extra.items():
        table = table.append_column(name, pa.array(values, pa.string()))
    return table


def _stage(seed: int = 0, **cfg) -> RecaptionStage:
    """A stage for plumbing tests: few new tokens, and in rewrite mode one greedy rewrite unless
    the test says otherwise (the papers' defaults are tested on their own)."""
    cfg.setdefault("max_new_tokens", NEW)
    if cfg.get("mode") == "rewrite":
        cfg.setdefault("num_rewrites", 1)
        cfg.setdefault("temperature", 0.0)
    return RecaptionStage(RecaptionConfig(**cfg), StageContext(seed=seed))


def _run(stage: RecaptionStage, table: pa.Table) -> pa.Table:
    stage.preflight()
    stage.setup()
    try:
        out = stage.process(table)
        assert out.schema == stage.process(table.schema.empty_table()).schema  # the worker's probe
        return out
    finally:
        stage.backend.close()


# -- prompts -------------------------------------------------------------------------------
def test_default_prompts_follow_the_papers():
    assert P.CAPTION_PROMPT == ("Please generate a detailed caption of this image. "
                                "Please be as descriptive as possible.")
    ex = [P.Example("white and red bedroom", "A cheerful white-and-red bedroom."),
          P.Example("golden fish in a bowl", "A golden fish swims in a bowl.")]
    rewrite = P.render(P.REWRITE_PROMPT, caption="dog on grass", examples=ex)
    assert rewrite == ("write image captions differently,\n\n"
                       "white and red bedroom => A cheerful white-and-red bedroom.\n\n"
                       "golden fish in a bowl => A golden fish swims in a bowl.\n\n"
                       "dog on grass =>")
    fuse = P.render(P.FUSE_PROMPT, caption="VW T-ROC teaser", synthetic="The wheel of an SUV.")
    assert fuse.startswith("Please merge and refine the information from the two given sentences.")
    assert fuse.endswith("Sentence 1: VW T-ROC teaser\nSentence 2: The wheel of an SUV.\nNew Sentence:")
    assert "{" not in fuse and "{" not in rewrite


@pytest.mark.parametrize("template, mode, message", [
    ("Describe {image}.", "caption", "unknown field"),
    ("Rewrite this.", "rewrite", "needs the field(s) ['caption']"),
    ("Merge {caption}.", "fuse", "['synthetic']"),
    ("Rewrite {caption!r}", "rewrite", "format spec or conversion"),
    ("Rewrite {0}", "rewrite", "not a name"),
    ("Rewrite {caption", "rewrite", "expected '}'"),
])
def test_bad_templates_are_refused(template, mode, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        P.check_template(template, mode)


def test_example_draws_are_deterministic_distinct_and_cover_the_pool():
    pool = P.load_examples(EXAMPLES)
    first = P.draw_examples(pool, 3, seed=0, uid="abc", index=0)
    assert first == P.draw_examples(pool, 3, seed=0, uid="abc", index=0)
    assert len(set(first)) == 3
    draws = {tuple(P.draw_examples(pool, 3, seed=0, uid=f"u{i}", index=0)) for i in range(50)}
    assert len(draws) > 40  # different samples, different examples
    assert P.draw_examples(pool, 3, 0, "abc", 1) != first or P.draw_examples(pool, 3, 0, "abc", 2) != first
    assert P.draw_examples(pool, 3, 1, "abc", 0) != first or P.draw_examples(pool, 3, 2, "abc", 0) != first
    counts = Counter(e for i in range(3000) for e in P.draw_examples(pool, 3, 0, f"u{i}", 0))
    assert set(counts) == set(pool)
    assert max(counts.values()) / min(counts.values()) < 1.3  # about uniform: 900 each
    assert P.draw_examples(pool, 20, 0, "abc", 0).__len__() == len(pool)  # k > pool: all of it


def test_generation_clean_up():
    assert P.clean_generation("  A red car\nnext => example", first_line=True) == "A red car"
    assert P.clean_generation("\n\n A red car\n", first_line=True) == "A red car"
    assert P.clean_generation("A red\ncar", first_line=False) == "A red car"
    assert P.clean_generation('"A quoted caption."', first_line=False) == "A quoted caption."
    assert P.clean_generation("a\x00b\x1bc", first_line=False) == "a b c"
    assert P.clean_generation(" \n\t", first_line=False) == ""
    assert P.clean_generation(None, first_line=False) == ""
    assert P.clip_text("one two three four five", 13) == "one two three"


def test_examples_from_files(tmp_path):
    (tmp_path / "ex.jsonl").write_text("\n".join(json.dumps(e) for e in EXAMPLES[:2]) + "\n")
    (tmp_path / "ex.json").write_text(json.dumps(EXAMPLES[:3]))
    (tmp_path / "bad.json").write_text(json.dumps([{"source": "x"}]))
    assert len(P.load_examples(str(tmp_path / "ex.jsonl"))) == 2
    assert len(P.load_examples(str(tmp_path / "ex.json"))) == 3
    with pytest.raises(ValueError, match=r"bad.json\[0\]"):
        P.load_examples(str(tmp_path / "bad.json"))


def test_defaults_are_the_papers():
    """rewrite: LaCLIP's llama_rewrite.py (temperature 0.9, top_p 0.95, max_gen_len 77) and its
    four rewrites per caption; caption: Recap-DataComp's greedy 128 tokens; a job's own values win."""
    rewrite = RecaptionConfig(mode="rewrite", backend="openai", model="m")
    assert (rewrite.temperature, rewrite.top_p, rewrite.max_new_tokens, rewrite.num_rewrites) == (0.9, 0.95, 77, 4)
    assert rewrite.num_examples == 3
    caption = RecaptionConfig(mode="caption", backend="openai", model="m")
    assert (caption.temperature, caption.top_p, caption.max_new_tokens, caption.num_rewrites) == (0.0, 1.0, 128, 1)
    fuse = RecaptionConfig(mode="fuse", backend="openai", model="m", fuse_column="c")
    assert (fuse.temperature, fuse.max_new_tokens, fuse.num_rewrites) == (0.0, 128, 1)
    own = RecaptionConfig(mode="rewrite", backend="openai", model="m", temperature=0.2, num_rewrites=2)
    assert (own.temperature, own.top_p, own.max_new_tokens, own.num_rewrites) == (0.2, 0.95, 77, 2)
    # the settings reach every backend's request
    stage = RecaptionStage(rewrite, StageContext(seed=0))
    req = stage.request("u1", "a dog", None, None, 0)
    body = OpenAIBackend("m", "http://h/v1", max_new_tokens=77, temperature=0.9, top_p=0.95).request_body(req)
    assert (body["max_tokens"], body["temperature"], body["top_p"], body["seed"]) == (77, 0.9, 0.95, req.seed)
    assert build_requests([req], chat=False, max_new_tokens=77, temperature=0.9, top_p=0.95)[1] == [
        {"max_tokens": 77, "temperature": 0.9, "top_p": 0.95, "n": 1, "seed": req.seed}]
    assert stage.output_type() == pa.list_(pa.string())
    assert stage.summary()["top_p"] == 0.95


def test_each_rewrite_draws_from_its_own_pool(tiny_lm):
    """LaCLIP rewrote every caption four times, each with examples from one of its four pools
    (ChatGPT, Bard, MSCOCO, human): rewrite k draws from pool k."""
    pools = [[{"source": f"pool{p} alt {i}", "target": f"Pool {p} caption {i}."} for i in range(5)] for p in range(4)]
    stage = _stage(mode="rewrite", backend="transformers", model=tiny_lm, example_pools=pools, num_rewrites=4,
                   temperature=0.9)
    for k in range(4):
        prompt = stage.request("uid7", "a cat on a mat", None, None, k).prompt
        assert prompt.count(f"pool{k} alt") == 3 and prompt.count("pool") == 3
    out = _run(stage, _table(["a cat on a mat", "dog in the park"]))
    assert [len(r) for r in out.column("recaption").to_pylist()] == [4, 4]
    again = _run(_stage(mode="rewrite", backend="transformers", model=tiny_lm, example_pools=pools, num_rewrites=4,
                        temperature=0.9), _table(["a cat on a mat", "dog in the park"]))
    assert again.column("recaption").to_pylist() == out.column("recaption").to_pylist()  # sampled, seeded
    facts = stage.summary()["examples"]
    assert facts["pools"] == [5, 5, 5, 5] and facts["count"] == 20 and facts["source"] == ["inline"] * 4
    with pytest.raises(ConfigError, match="recaption.example_pools: give examples"):
        _stage(mode="rewrite", backend="transformers", model=tiny_lm, example_pools=pools, examples=EXAMPLES).preflight()
    with pytest.raises(ConfigError, match="recaption.example_pools: only rewrite"):
        _stage(mode="caption", backend="transformers", model=tiny_lm, example_pools=pools).preflight()
    with pytest.raises(ConfigError, match="recaption.example_pools: every pool"):
        _stage(mode="rewrite", backend="transformers", model=tiny_lm, example_pools=[pools[0], []]).preflight()


# -- configuration errors ------------------------------------------------------------------
@pytest.mark.parametrize("cfg, key", [
    ({"mode": "fuse"}, "recaption.fuse_column"),
    ({"mode": "rewrite", "fuse_column": "x"}, "recaption.fuse_column"),
    ({"mode": "rewrite", "prompt": "Rewrite {alt}"}, "recaption.prompt"),
    ({"mode": "caption", "examples": EXAMPLES}, "recaption.examples"),
    ({"mode": "rewrite", "examples": "/nonexistent/examples.json"}, "recaption.examples"),
    ({"mode": "caption", "num_rewrites": 2}, "recaption.num_rewrites"),
    ({"mode": "rewrite", "output_column": "caption"}, "recaption.output_column"),
    ({"mode": "caption", "chat": False}, "recaption.chat"),
    ({"mode": "rewrite", "endpoint": None}, "recaption.endpoint"),
    ({"mode": "rewrite", "api_key_env": "PAIRSIFT_TEST_NO_SUCH_KEY"}, "recaption.api_key_env"),
    ({"mode": "rewrite", "check_endpoint": True, "timeout_s": 2}, "recaption.endpoint"),  # nothing listens
    ({"mode": "rewrite", "backend": "transformers", "model": "/nonexistent/model"}, "recaption.model"),
])
def test_configuration_errors_name_the_key(cfg, key):
    base = {"backend": "openai", "model": "m", "endpoint": "http://127.0.0.1:9/v1", "check_endpoint": False}
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _stage(**{**base, **cfg}).preflight()


def test_cli_exits_2_before_writing_anything(sample_pool, tmp_path, capsys):
    import yaml

    from pairsift.cli import main

    spec = {"name": "r", "input": {"format": "webdataset", "path": str(sample_pool)}, "output": str(tmp_path / "out"),
            "stages": [{"recaption": {"mode": "fuse", "backend": "openai", "model": "m", "endpoint": "http://h/v1"}}]}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    assert main(["run", str(tmp_path / "job.yaml")]) == 2
    assert "recaption.fuse_column" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_transformers_model_of_the_wrong_kind_is_refused(tiny_lm, tiny_ved):
    with pytest.raises(ConfigError, match="recaption.model.*image-text-to-text"):
        _stage(mode="caption", backend="transformers", model=tiny_lm).preflight()
    with pytest.raises(ConfigError, match="recaption.model.*language model"):
        _stage(mode="rewrite", backend="transformers", model=tiny_ved).preflight()


def test_openai_preflight_asks_the_server_for_the_model(lm_server):
    _stage(mode="rewrite", backend="openai", model="tiny-lm", endpoint=lm_server.url).preflight()
    with pytest.raises(ConfigError, match=r"recaption\.model: .* does not serve 'llama-70b'"):
        _stage(mode="rewrite", backend="openai", model="llama-70b", endpoint=lm_server.url).preflight()


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_missing_is_a_config_error():
    with pytest.raises(ConfigError, match=r"recaption\.backend: vllm is not installed"):
        _stage(mode="rewrite", backend="vllm", model="Qwen/Qwen2.5-1.5B-Instruct").preflight()


def test_resources_follow_the_backend_and_the_cluster():
    def ask(cluster, **cfg):
        stage = RecaptionStage(RecaptionConfig(mode="rewrite", model="m", **cfg),
                               StageContext(extras={} if cluster is None else {"cluster": cluster}))
        return stage.resources().gpus

    assert ask({"CPU": 8, "GPU": 4}, backend="vllm") == 1
    assert ask({"CPU": 8, "GPU": 4}, backend="vllm", engine_args={"tensor_parallel_size": 2}) == 2
    assert ask({"CPU": 8, "GPU": 4}, backend="transformers") == 1
    assert ask({"CPU": 8}, backend="transformers") == 0
    assert ask({"CPU": 8, "GPU": 4}, backend="openai") == 0
    assert ask({"CPU": 8, "GPU": 4}, backend="transformers", num_gpus=0.25) == 0.25
    with pytest.raises(ConfigError, match=r"recaption\.num_gpus: the vllm backend .* has none"):
        ask({"CPU": 8}, backend="vllm")


# -- transformers backend ------------------------------------------------------------------
def test_transformers_rewrite_adds_columns_and_keeps_every_sample(tiny_lm):
    captions = ["a cat on a mat", "dog in the park", "   ", "red car by the sea"]
    table = _table(captions, dropped={3})
    out = _run(_stage(mode="rewrite", backend="transformers", model=tiny_lm, examples=EXAMPLES), table)
    assert out.schema.field("recaption").type == pa.string()
    assert out.column("caption").to_pylist() == captions  # never overwritten
    assert out.column("drop_reason").to_pylist() == [None, None, None, "too_small"]  # nothing dropped
    rec = out.column("recaption").to_pylist()
    assert all(isinstance(r, str) and r for r in rec[:2])
    assert rec[2:] == [None, None]
    assert out.column("recaption_model").to_pylist() == [tiny_lm] * 3 + [None]
    assert out.column("recaption_error").to_pylist() == [None, None, "no caption to rewrite", None]
    again = _run(_stage(mode="rewrite", backend="transformers", model=tiny_lm, examples=EXAMPLES), table)
    assert again.column("recaption").to_pylist() == rec  # greedy and seeded: reproducible


def test_rewrites_are_lists_each_from_its_own_examples(tiny_lm):
    stage = _stage(mode="rewrite", backend="transformers", model=tiny_lm, examples=EXAMPLES, num_rewrites=3,
                   chat=False)
    out = _run(stage, _table(["a cat on a mat", "dog in the park"]))
    assert out.schema.field("recaption").type == pa.list_(pa.string())
    assert [len(r) for r in out.column("recaption").to_pylist()] == [3, 3]
    prompts = [stage.request("uid000", "a cat on a mat", None, None, k).prompt for k in range(3)]
    assert len(set(prompts)) == 3  # LaCLIP: a fresh draw of examples per rewrite
    assert all(p.startswith("write image captions differently,\n\n") and p.endswith("a cat on a mat =>")
               for p in prompts)
    assert stage.summary()["columns"]["type"] == "list<item: string>"
    assert stage.summary()["examples"]["count"] == 10


def test_transformers_fuse_on_capsfusion_triples(tiny_lm):
    triples = json.loads((shared_path("realdata", "laion2b_capsfusion_recaptions_10k") / "example_data.json")
                         .read_text())[:6]
    alts = [t["laion_2b"] for t in triples]
    blip = [t["laion_coco"] for t in triples]
    blip[5] = None  # the caption pass failed for this one
    stage = _stage(mode="fuse", backend="transformers", model=tiny_lm, fuse_column="blip_caption")
    out = _run(stage, _table(alts, blip_caption=blip))
    rec = out.column("recaption").to_pylist()
    assert all(rec[:5]) and rec[5] is None
    assert out.column("recaption_error").to_pylist()[5] == "no blip_caption to fuse"
    assert out.column("caption").to_pylist() == alts
    prompt = stage.request("uid000", alts[0], None, blip[0], 0).prompt
    assert prompt == P.FUSE_PROMPT.format(caption=" ".join(alts[0].split()), synthetic=blip[0])
    assert stage.summary()["prompt_sha256"] == hashlib.sha256(P.FUSE_PROMPT.encode()).hexdigest()


def test_transformers_caption_with_a_plain_captioner(tiny_ved, photos):
    images = [photos["jpeg"], photos["png"], b"\xff\xd8\xff this is not a jpeg", photos["gif"]]
    out = _run(_stage(mode="caption", backend="transformers", model=tiny_ved, concurrency=4),
               _table(["alt"] * 4, images=images))
    rec, err = out.column("recaption").to_pylist(), out.column("recaption_error").to_pylist()
    assert rec[0] and rec[1] and rec[3] and rec[2] is None
    assert err[0] is err[1] is err[3] is None
    assert err[2]  # one bad image costs one sample
    assert out.column("drop_reason").null_count == 4


def test_transformers_caption_with_a_prompted_vlm(tiny_llava, photos):
    stage = _stage(mode="caption", backend="transformers", model=tiny_llava, concurrency=2)
    out = _run(stage, _table(["alt"] * 3, images=[photos["jpeg"], photos["png"], photos["gif"]]))
    assert stage.backend.uses_chat  # LLaVA got Recap-DataComp's prompt with the image
    assert all(out.column("recaption").to_pylist())


# -- openai backend ------------------------------------------------------------------------
@pytest.mark.parametrize("chat", [True, False])
def test_openai_through_the_server_matches_transformers(lm_server, tiny_lm, chat):
    captions = ["a cat on a mat", "dog in the park", "red car by the sea", "the moon at night"]
    lm_server.reset()
    via_server = _run(_stage(mode="rewrite", backend="openai", model="tiny-lm", endpoint=lm_server.url,
                             examples=EXAMPLES, chat=chat), _table(captions))
    local = _run(_stage(mode="rewrite", backend="transformers", model=tiny_lm, examples=EXAMPLES, chat=chat,
                        concurrency=1), _table(captions))
    assert via_server.column("recaption").to_pylist() == local.column("recaption").to_pylist()
    assert via_server.column("recaption_error").null_count == 4
    route = "/v1/chat/completions" if chat else "/v1/completions"
    assert [r["route"] for r in lm_server.requests] == [route] * 4
    assert {r["body"]["max_tokens"] for r in lm_server.requests} == {NEW}


def test_openai_keeps_concurrency_requests_in_flight(lm_server):
    lm_server.latency_s = 0.3
    try:
        for concurrency in (4, 1):
            lm_server.reset()
            stage = _stage(mode="rewrite", backend="openai", model="tiny-lm", endpoint=lm_server.url,
                           concurrency=concurrency, check_endpoint=False)
            n = 12 if concurrency > 1 else 3
            t0 = time.perf_counter()
            out = _run(stage, _table([f"caption number {i}" for i in range(n)]))
            wall = time.perf_counter() - t0
            assert out.column("recaption_error").null_count == n
            assert len(lm_server.requests) == n
            assert lm_server.max_inflight == concurrency  # the pool is used, and bounded
        assert wall >= 3 * 0.3  # one at a time
    finally:
        lm_server.latency_s = 0.0


def test_openai_failures_become_errors_and_never_stop_the_batch(lm_server):
    lm_server.reset()
    captions = ["a plain caption", "[slow] a caption", "[flaky] a caption", "[malformed] a caption",
                "[empty] a caption"]
    stage = _stage(mode="rewrite", backend="openai", model="tiny-lm", endpoint=lm_server.url, timeout_s=1.0,
                   retries=1, concurrency=5, check_endpoint=False)
    t0 = time.perf_counter()
    out = _run(stage, _table(captions))
    assert time.perf_counter() - t0 < 10
    rec, err = out.column("recaption").to_pylist(), out.column("recaption_error").to_pylist()
    assert rec[0] and err[0] is None
    assert rec[1] is None and err[1].startswith("timeout: no answer within 1 s (2 attempt(s))")
    assert rec[2] and err[2] is None  # the 500 was retried
    assert Counter(r["prompt"] for r in lm_server.requests)[stage.request("uid002", captions[2], None, None, 0).prompt] == 2
    assert rec[3] is None and err[3].startswith("malformed response:")
    assert rec[4] is None and err[4] == "empty generation"
    assert out.column("drop_reason").null_count == 5 and out.column("caption").to_pylist() == captions


def test_openai_caption_sends_images_as_data_urls(tiny_llava, photos):
    backend = TransformersBackend(tiny_llava, vision=True, max_new_tokens=NEW, batch_size=1)
    backend.load()
    images = [photos["jpeg"], photos["png"], photos["gif"]]
    with LocalOpenAIServer(model="tiny-llava", backends={True: backend}) as server:
        out = _run(_stage(mode="caption", backend="openai", model="tiny-llava", endpoint=server.url),
                   _table(["alt"] * 3, images=images))
        sent = [(r["mime"], r["image"]) for r in server.requests]
        assert [r["prompt"] for r in server.requests] == [P.CAPTION_PROMPT] * 3
    assert ("image/jpeg", photos["jpeg"]) in sent and ("image/png", photos["png"]) in sent  # as received
    converted = [img for mime, img in sent if mime == "image/png" and img != photos["png"]]
    assert len(converted) == 1 and Image.open(io.BytesIO(converted[0])).size == (40, 30)  # the GIF, as PNG
    local = _run(_stage(mode="caption", backend="transformers", model=tiny_llava, concurrency=1),
                 _table(["alt"] * 3, images=images))
    assert out.column("recaption").to_pylist() == local.column("recaption").to_pylist()


# -- vllm backend (request building and output parsing; the engine needs a GPU) -------------
def test_vllm_request_building():
    reqs = [GenRequest("Describe it.", image=b"\x89PNG\r\n\x1a\n fake", seed=7), GenRequest("Rewrite x =>", seed=9)]
    inputs, params = build_requests(reqs, chat=True, max_new_tokens=64, temperature=0.0)
    assert inputs[0][0]["role"] == "user"
    image_part, text_part = inputs[0][0]["content"]
    assert image_part["image_url"]["url"].startswith("data:image/png;base64,")
    assert text_part == {"type": "text", "text": "Describe it."}
    assert inputs[1] == [{"role": "user", "content": "Rewrite x =>"}]
    assert params == [{"max_tokens": 64, "temperature": 0.0, "n": 1}] * 2  # greedy: no seed
    inputs, params = build_requests(reqs[1:], chat=False, max_new_tokens=16, temperature=0.7)
    assert inputs == ["Rewrite x =>"] and params == [{"max_tokens": 16, "temperature": 0.7, "n": 1, "seed": 9}]
    with pytest.raises(ValueError, match="images need chat"):
        build_requests(reqs, chat=False, max_new_tokens=16, temperature=0.0)


def test_vllm_output_parsing():
    def out(*texts):
        return SimpleNamespace(outputs=[SimpleNamespace(text=t, finish_reason="stop") for t in texts])

    gens = parse_outputs([out("A caption."), out(), SimpleNamespace(outputs=None), out(None)], expected=4)
    assert gens[0].text == "A caption." and gens[0].error is None
    assert [g.error for g in gens[1:]] == ["malformed response: no completion"] * 2 + [
        "malformed response: completion has no text"]
    with pytest.raises(ValueError, match="2 outputs for 3 requests"):
        parse_outputs([out("a"), out("b")], expected=3)


def test_vllm_batch_the_engine_refuses_is_split_to_find_the_bad_request():
    class EngineDouble:  # what vllm.LLM.chat does with a prompt over the context: raise for the batch
        calls = 0

        def chat(self, messages, sampling_params, use_tqdm):
            EngineDouble.calls += 1
            if any("too long" in m[0]["content"] for m in messages):
                raise ValueError("prompt is longer than the maximum model length")
            return [SimpleNamespace(outputs=[SimpleNamespace(text=f"ok {m[0]['content']}")]) for m in messages]

    backend = VllmBackend("m", max_new_tokens=8)
    backend._llm, backend._sampling_params = EngineDouble(), dict
    gens = backend.generate([GenRequest("one"), GenRequest("too long"), GenRequest("three")])
    assert [g.text for g in gens] == ["ok one", None, "ok three"]
    assert "maximum model length" in gens[1].error
    assert EngineDouble.calls == 4


# -- jobs ----------------------------------------------------------------------------------
def _tar_texts(out) -> dict[str, tuple[str, dict]]:
    res = {}
    for p in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(p) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
        for name, data in members.items():
            if name.endswith(".txt"):
                uid = name[:-4]
                res[uid] = (data.decode(), json.loads(members[f"{uid}.json"]))
    return res


def test_job_recaptions_and_emits_by_caption_policy(ray_session, sample_pool, lm_server, tmp_path):
    lm_server.reset()
    stages = [{"quality": {}},
              {"recaption": {"mode": "rewrite", "backend": "openai", "model": "tiny-lm", "num_rewrites": 1,
                             "temperature": 0.0, "endpoint": lm_server.url, "examples": EXAMPLES,
                             "max_new_tokens": NEW}}]
    out = tmp_path / "out"
    result = run_job_quiet(make_job(sample_pool, out, stages=stages,
                                    emit={"caption_policy": "mix", "p_original": 0.5}))
    meta = pq.read_table(out / "metadata")
    assert {"recaption", "recaption_model", "recaption_error", "text_source"} <= set(meta.column_names)
    assert meta.column("recaption_error").null_count == meta.num_rows
    assert len(lm_server.requests) == meta.num_rows  # one request per sample that passed quality
    texts = _tar_texts(out)
    policy = CaptionPolicy("mix", 0.5, seed=0)
    sources = Counter()
    for uid, (txt, record) in texts.items():
        assert record["caption"] and record["recaption"]  # the json carries both
        expect, source = policy.choose(uid, record["caption"], record["recaption"])
        assert (txt, record["text_source"]) == (expect, source)
        sources[source] += 1
    assert sources["original"] and sources["recaption"]
    (summary,) = recaption_summaries(connect(str(out)))  # pairsift stats
    assert summary[:5] == ("recaption", meta.num_rows, meta.num_rows, 0, None)
    assert "recaptions (kept samples)" in stats_text(str(out))
    facts = result.manifest["stage_facts"]["1:recaption"]
    assert (facts["model"], facts["backend"], facts["mode"]) == ("tiny-lm", "openai", "rewrite")
    assert facts["prompt"] == P.REWRITE_PROMPT
    assert facts["prompt_sha256"] == hashlib.sha256(P.REWRITE_PROMPT.encode()).hexdigest()


def test_killed_job_resumes_without_repeating_committed_shards(ray_session, lm_server, tmp_path):
    from pairsift.samplepool import write_pool

    pool = tmp_path / "pool"
    write_pool(str(pool), shard_size=8)  # 7 shards
    flag = tmp_path / "outage"
    flag.write_text("on")
    stages = [{"quality": {}},
              {"recaption": {"mode": "rewrite", "backend": "openai", "model": "tiny-lm", "num_rewrites": 1,
                             "temperature": 0.0, "endpoint": lm_server.url, "max_new_tokens": NEW}},
              {"fault_injection": {"fail_shard": "00003.tar", "fail_while_exists": str(flag)}}]
    out = tmp_path / "out"
    spec = make_job(pool, out, stages=stages, ray={"num_cpus": 1})
    lm_server.reset()
    with pytest.raises(JobError, match="00003.tar"):
        run_job_quiet(spec)
    first = Counter(r["prompt"] for r in lm_server.requests)
    assert sorted(p.name for p in (out / "_work" / "ledger" / "p0").glob("*.json")) == [
        "000000.json", "000001.json", "000002.json"]

    flag.unlink()
    lm_server.reset()
    run_job_quiet(spec)
    second = Counter(r["prompt"] for r in lm_server.requests)
    rows = pq.read_table(out / "metadata").to_pylist() + pq.read_table(out / "rejected").to_pylist()
    asked = [r for r in rows if r["recaption_model"] is not None]  # every sample that reached the stage
    prompt = {r["uid"]: P.render(P.REWRITE_PROMPT, caption=r["caption"]) for r in asked}
    committed = [r for r in asked if r["source"].rsplit("/", 1)[-1] in ("00000.tar", "00001.tar", "00002.tar")]
    rest = [r for r in asked if r not in committed]
    assert committed and rest
    # The second run asked nothing of the committed shards, and at most once for each sample of the
    # others; what the first run already generated for the failed shard (before a later stage
    # failed) comes from the compute cache, so every sample was asked in one run or the other.
    assert not set(second) & {prompt[r["uid"]] for r in committed}
    assert all(n == 1 for n in second.values()) and set(second) <= {prompt[r["uid"]] for r in rest}
    assert {prompt[r["uid"]] for r in rest} <= set(second) | set(first)
    assert all(first[prompt[r["uid"]]] == 1 for r in committed)
    assert all(r["recaption"] for r in asked)


def run_job_quiet(spec):
    from pairsift.pipeline.runner import run_job

    return run_job(spec)
