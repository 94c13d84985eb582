"""Capture sites against independent references, early stopping, filtering, and config/model mismatch.

Tiny GPT-2 and Llama models are built here, saved to a temporary directory with a byte-level BPE
tokenizer trained on a few lines of text, and loaded back through `model.name=<that directory>`:
the same path a hub model takes. Nothing needs the network.
"""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
import torch

from actdata import points as pts
from actdata.config import SITES, Config, ConfigError
from actdata.generation.loading import load_model
from actdata.generation.model_source import ModelSource
from actdata.generation.sites import Capture, OutlierFilter, keep_mask, make_plan, sample_shape
from actdata.generation.text import TokenBlocks
from actdata.shm.gather import gather

TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "A stitch in time saves nine; many hands make light work.",
    "In the beginning was the word, and the word was short.",
    "Activations flow from text through blocks into a shared buffer.",
    "Sparse autoencoders read the residual stream one token at a time.",
] * 4
N_LAYERS = 3


def train_tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    fast.save_pretrained(path)
    return fast


def build(kind, path):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = train_tokenizer(path)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=64, n_layer=N_LAYERS, n_head=4,
                                           bos_token_id=1, eos_token_id=2))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96,
                                             num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                                             pad_token_id=0))
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request, tmp_path_factory):
    return request.param, build(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    with open(path, "w") as f:
        for i, t in enumerate(TEXT):
            f.write(json.dumps({"text": f"{t} Number {i}.", "id": i}) + "\n")
    return str(path)


def make_cfg(model, corpus=None, sites=("resid_post",), layers=(1,), **gen):
    cfg = Config()
    cfg.model.name = model
    cfg.model.dtype = "float32"  # compared with float32 references (auto may mean bfloat16 on this CPU)
    cfg.dataset.name = corpus or "embedded"
    g = cfg.generator
    g.source, g.sites, g.layers, g.batch_size, g.context_length = (
        "model", list(sites), layers if layers == "all" else list(layers), 2, 16)
    for k, v in gen.items():
        setattr(g, k, v)
    return cfg


def reference(kind, path, input_ids):
    """Every named point at every block of a FULL forward of the causal-LM model, from its own
    hidden states and explicit hooks, plus the model's final-norm-free hidden states: {site: [L, B, T, d]}."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    blocks = model.transformer.h if kind == "gpt2" else model.model.layers
    got = {s: [None] * N_LAYERS for s in SITES}
    hooks = []
    for i, b in enumerate(blocks):
        attn, mlp = (b.attn, b.mlp) if kind == "gpt2" else (b.self_attn, b.mlp)
        hooks.append(attn.register_forward_hook(lambda m, a, o, i=i: got["attn_out"].__setitem__(i, o[0])))
        hooks.append(mlp.register_forward_hook(lambda m, a, o, i=i: got["mlp_out"].__setitem__(i, o)))
        hooks.append(mlp.register_forward_pre_hook(lambda m, a, i=i: got["mlp_in"].__setitem__(i, a[0])))
        hooks.append(b.register_forward_hook(
            lambda m, a, o, i=i: got["resid_post"].__setitem__(i, o[0] if isinstance(o, tuple) else o)))
    with torch.no_grad():
        out = model(input_ids, output_hidden_states=True, use_cache=False)
    hs = out.hidden_states
    got["resid_pre"] = list(hs[:N_LAYERS])
    # independent checks of the hooks: hidden_states carry resid_post of all but the last block (the
    # last entry has the final norm applied), and the residual adds up
    for i in range(N_LAYERS - 1):
        torch.testing.assert_close(got["resid_post"][i], hs[i + 1])
    for i, b in enumerate(blocks):
        ln2 = b.ln_2 if kind == "gpt2" else b.post_attention_layernorm
        torch.testing.assert_close(ln2(hs[i] + got["attn_out"][i]), got["mlp_in"][i])
        torch.testing.assert_close(hs[i] + got["attn_out"][i] + got["mlp_out"][i], got["resid_post"][i])
    return {s: torch.stack(v) for s, v in got.items()}, model, blocks


def test_every_named_point_at_every_layer_matches_reference(tiny):
    kind, path = tiny
    cfg = make_cfg(path, sites=SITES, layers="all")
    assert sample_shape(cfg) == (len(SITES), N_LAYERS, 64)
    model = load_model(cfg, "cpu")
    plan = make_plan(cfg, model, model.config)
    ids = torch.randint(3, 200, (2, 16))
    rows = Capture(model, plan, torch.float32)(ids, None, torch.arange(32))  # every position
    ref, _, _ = reference(kind, path, ids)
    for p, site in enumerate(SITES):
        for layer in range(N_LAYERS):
            torch.testing.assert_close(rows[:, p, layer], ref[site][layer].reshape(32, 64), msg=f"{site}@{layer}")
    # a point's name (actdata.points) selects that site at that block, through the buffer's gather
    names = pts.configured(cfg, plan.shape)
    for site in SITES:
        for layer in range(N_LAYERS):
            (i,) = pts.resolve(pts.parse(f"{site}@{layer}")[0], names)
            got = gather(rows, np.arange(32), [i])[:, 0]
            torch.testing.assert_close(got, ref[site][layer].reshape(32, 64), msg=f"{site}@{layer}")


@pytest.mark.parametrize("site,layer", [("resid_post", 0), ("mlp_in", 1), ("resid_pre", 1), ("attn_out", 2)])
def test_early_stop_skips_later_blocks_and_keeps_values(tiny, site, layer):
    kind, path = tiny
    cfg = make_cfg(path, sites=[site], layers=[layer])
    model = load_model(cfg, "cpu")
    blocks = model.h if kind == "gpt2" else model.layers
    calls = [0] * N_LAYERS
    for i, b in enumerate(blocks):
        b.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
    mlp_calls = []
    blocks[layer].mlp.register_forward_pre_hook(lambda m, a: mlp_calls.append(1))
    plan = make_plan(cfg, model, model.config)
    assert plan.shape == (64,)
    ids = torch.randint(3, 200, (2, 16))
    index = torch.tensor([1, 5, 16, 31])
    rows = Capture(model, plan, torch.float32)(ids, None, index)
    ref, _, _ = reference(kind, path, ids)
    torch.testing.assert_close(rows[:, 0, 0], ref[site][layer].reshape(32, 64)[index])
    assert calls[layer + 1:] == [0] * (N_LAYERS - layer - 1), "blocks after the last site ran"
    # the last block's MLP is entered only when a site needs it (mlp_in stops at its input)
    assert len(mlp_calls) == (site in ("mlp_in", "mlp_out", "resid_post"))


def test_raw_sites_with_layer_placeholder_and_causal_lm_prefix(tiny):
    kind, path = tiny
    raw = ("transformer.h.{layer}.mlp.c_proj:input" if kind == "gpt2" else "model.layers.{layer}.mlp.down_proj:input")
    cfg = make_cfg(path, sites=[raw], layers=[0, 2])
    width = 256 if kind == "gpt2" else 96
    assert sample_shape(cfg) == (1, 2, width)
    model = load_model(cfg, "cpu")
    plan = make_plan(cfg, model, model.config)
    ids = torch.randint(3, 200, (2, 16))
    rows = Capture(model, plan, torch.float32)(ids, None, torch.arange(32))
    _, ref_model, blocks = reference(kind, path, ids)
    seen = {}
    for i in (0, 2):
        proj = blocks[i].mlp.c_proj if kind == "gpt2" else blocks[i].mlp.down_proj
        proj.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0]))
    with torch.no_grad():
        ref_model(ids, use_cache=False)
    for li, i in enumerate((0, 2)):
        torch.testing.assert_close(rows[:, 0, li], seen[i].reshape(32, width))


def test_keep_mask_drops_exactly_pad_bos_and_special():
    ids = torch.tensor([[1, 10, 2, 11, 12, 0, 0],
                        [1, 13, 14, 1, 15, 16, 17]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0],
                         [1, 1, 1, 1, 1, 1, 1]])
    specials = {0, 1, 2}
    keep = keep_mask(ids, mask, specials, drop_bos=True, drop_special=True)
    assert keep.tolist() == [[0, 1, 0, 1, 1, 0, 0], [0, 1, 1, 0, 1, 1, 1]]
    keep = keep_mask(ids, mask, specials, drop_bos=False, drop_special=True)
    assert keep.tolist() == [[1, 1, 0, 1, 1, 0, 0], [1, 1, 1, 0, 1, 1, 1]]
    keep = keep_mask(ids, mask, specials, drop_bos=True, drop_special=False)
    assert keep.tolist() == [[0, 1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1]]


def test_outlier_filter_drops_only_large_norm_rows():
    torch.manual_seed(0)
    rows = torch.randn(100, 2, 1, 8)
    rows[7, 1, 0] *= 50
    rows[42, 0, 0] *= 50
    keep = OutlierFilter(10.0)(rows)
    assert (~keep).nonzero().flatten().tolist() == [7, 42]


def test_a_bad_corpus_stops_the_source_before_its_model_loads(tiny, tmp_path, monkeypatch):
    """A dataset that does not open or lacks the text column fails in the source's constructor, naming
    the key, before the tokenizer and model are loaded (a production model takes minutes)."""
    import actdata.generation.model_source as pipeline

    def loaded(*a, **k):
        raise AssertionError("the model was loaded before the corpus was checked")
    monkeypatch.setattr(pipeline, "load_model", loaded)
    monkeypatch.setattr(pipeline, "load_tokenizer", loaded)
    (tmp_path / "a.jsonl").write_text('{"content": "some words"}\n')
    for name, key in ((str(tmp_path / "missing.jsonl"), "dataset.name"),
                      (str(tmp_path / "a.jsonl"), "dataset.text_column")):
        with pytest.raises(ConfigError, match="^" + key.replace(".", r"\.")):
            ModelSource(make_cfg(tiny[1], name), "cpu", index=0, loop=False)


def test_model_source_rows_equal_reference_on_packed_text(tiny, corpus):
    kind, path = tiny
    cfg = make_cfg(path, corpus, sites=["resid_pre", "mlp_out"], layers=[0, 1])
    src = ModelSource(cfg, "cpu", index=3, loop=False)
    items = list(src)
    # the same blocks, made independently, through a full reference forward
    blocks = list(TokenBlocks(cfg.dataset, src.tokenizer, 16, 2, loop=False))
    assert len(items) == len(blocks) > 3
    special = set(src.tokenizer.all_special_ids)
    contexts = 0
    for (rows, origin, info), b in zip(items, blocks):
        ref, _, _ = reference(kind, path, b.input_ids)
        keep = b.attention_mask.bool() & ~torch.isin(b.input_ids, torch.tensor(sorted(special)))
        keep[:, 0] = False
        n = int(keep.sum())
        assert rows.shape == (n, 2, 2, 64) and rows.dtype == torch.float32
        torch.testing.assert_close(rows[:, 0], ref["resid_pre"][:2].permute(1, 2, 0, 3)[keep])
        torch.testing.assert_close(rows[:, 1], ref["mlp_out"][:2].permute(1, 2, 0, 3)[keep])
        ctx = torch.arange(len(b.input_ids))[:, None].expand_as(keep)[keep] + contexts
        assert origin.tolist() == ((3 << 40) | ctx).tolist()
        assert info["contexts"] == len(b.input_ids) and info["tokens"] == int(b.attention_mask.sum())
        contexts += len(b.input_ids)
    assert items[-1][2]["corpus_passes"] == 1
    assert not (blocks[-1].attention_mask.all()), "the last block of a finite corpus should be padded"


def test_model_dtype_bfloat16_gives_close_rows_in_buffer_dtype(tiny):
    kind, path = tiny
    cfg = make_cfg(path, sites=["resid_post"], layers=[1])
    cfg.model.dtype, cfg.buffer.dtype = "bfloat16", "float16"
    model = load_model(cfg, "cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    ids = torch.randint(3, 200, (2, 16))
    rows = Capture(model, make_plan(cfg, model, model.config), torch.float16)(ids, None, torch.arange(32))
    ref, _, _ = reference(kind, path, ids)
    assert rows.dtype == torch.float16
    torch.testing.assert_close(rows[:, 0, 0].float(), ref["resid_post"][1].reshape(32, 64), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("change,key", [
    ({"activation_dim": 768}, "buffer.activation_dim"),
    ({"sample_shape": [64]}, "buffer.sample_shape"),
    ({"layers": [N_LAYERS]}, "generator.layers"),
    ({"sites": ["transformer.h.0.nope:output"]}, "generator.sites"),
    ({"sites": ["resid_post", "transformer.h.0.mlp.c_fc:output"]}, "generator.sites"),
])
def test_config_contradicting_the_model_names_the_key(tiny, change, key):
    kind, path = tiny
    cfg = make_cfg(path)
    for k, v in change.items():
        if kind == "llama" and k == "sites":
            v = [s.replace("transformer.h", "model.layers").replace("c_fc", "up_proj") for s in v]
        setattr(cfg.buffer if k in ("activation_dim", "sample_shape") else cfg.generator, k, v)
    with pytest.raises(ConfigError) as e:
        sample_shape(cfg)
    assert str(e.value).startswith(key + ":") and "\n" not in str(e.value)


def test_unknown_model_names_model_key(tmp_path):
    cfg = make_cfg(str(tmp_path / "no-such-model"))
    with pytest.raises(ConfigError, match=r"^model\.name:"):
        sample_shape(cfg)


def test_activation_dim_equal_to_model_width_is_accepted(tiny):
    _, path = tiny
    cfg = make_cfg(path, sites=["mlp_in", "mlp_out"], layers="all", squeeze=True)
    cfg.buffer.activation_dim = 64
    assert sample_shape(cfg) == (2, N_LAYERS, 64)
