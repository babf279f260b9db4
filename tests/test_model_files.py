"""Model files that are damaged, cut short or foreign (chapters 1, 3, 4, 5 and 6): one ValueError that names the file
and says what is wrong, raised before anything is built from it."""
import json
import re
import shutil

import gguf
import numpy as np
import pytest
import torch
from gguf_files import gguf_name, write_llama_gguf
from safetensors.torch import save_file

from ch01_tokenization.tokenization import BPETokenizer, bytes_to_unicode
from ch03_gpt_model.gpt import GPTConfig, GPTModel
from ch04_pretraining.config import TrainConfig
from ch04_pretraining.pretraining import train
from ch04_pretraining.runs import CheckpointError, checkpoint_paths, load_run, pointed_step
from ch05_finetuning.finetuning import FinetuneConfig, finetune, load_finetuned
from ch06_llama.chat import load_chat_model
from ch06_llama.checkpoints import read_gguf, safetensors_files
from ch06_llama.layers import LlamaConfig
from ch06_llama.llama import LlamaModel

BYTES = list(bytes_to_unicode().values())                     # the 256 byte-level tokens, ids 0..255
MERGES = ["h e", "Ġ t"]                                        # make "he" (256) and "Ġt" (257)
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]     # 258, 259, 260
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_chat_gguf(path, tokens: list[str] | None = None, merges: list[str] = MERGES, bos: int = 260,
                    eos: int = 259, vocab_size: int = 261) -> None:
    """A tiny tied Llama with a byte-level BPE tokenizer and a chat template, as one float32 GGUF file. The
    arguments make a damaged one."""
    tokens = tokens or BYTES + ["he", "Ġt"] + SPECIALS
    cfg = LlamaConfig(vocab_size=vocab_size, context_length=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=32,
                      ffn_hidden=64, rope_theta=10000.0, rope_scaling=None)
    torch.manual_seed(0)
    model = LlamaModel(cfg)

    def tokenizer(writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(tokens)
        writer.add_token_types([3 if token in SPECIALS else 1 for token in tokens])
        writer.add_token_merges(merges)
        writer.add_bos_token_id(bos)
        writer.add_eos_token_id(eos)
        writer.add_chat_template(TEMPLATE)

    tensors = {gguf_name(name): tensor.numpy() for name, tensor in model.state_dict().items()
               if name != "lm_head.weight"}                     # tied: the embedding
    write_llama_gguf(path, cfg, tensors, tokenizer)


@pytest.fixture
def chat_gguf(tmp_path):
    path = tmp_path / "chat.gguf"
    write_chat_gguf(path)
    return path


def test_the_tiny_chat_gguf_loads_and_talks(chat_gguf):
    chat_model = load_chat_model(chat_gguf)
    assert chat_model.end_of_turn == 259
    ids = chat_model.encode([{"role": "user", "content": "the"}])
    assert ids[0] == 258 and 256 in ids                         # <|im_start|>, and "he" merged


def cut(path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def patch(path, change) -> None:
    """Change numbers in the file where the gguf package reads them (its arrays are views of the file)."""
    change(gguf.GGUFReader(path, "r+"))


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(b"not a model"), "is not a GGUF file: it does not begin with GGUF's 24-byte header"),
    (lambda p: cut(p, 300), "its header claims 11 tensors and 19 metadata entries, more than its 300 bytes can "
                            "hold: the file was cut short or is damaged"),
    (lambda p: cut(p, 1000), "ends at byte 1,000, inside its metadata or tensor table, which goes on to byte"),
    (lambda p: cut(p, p.stat().st_size - 100), "inside its tensor data, which goes on to byte"),
    (lambda p: patch(p, lambda r: r.fields["GGUF.kv_count"].parts[0].__setitem__(0, 2**62)),
     "its header claims 11 tensors and 4,611,686,018,427,387,904 metadata entries, more than its"),
    (lambda p: patch(p, lambda r: r.fields["GGUF.tensor_count"].parts[0].__setitem__(0, 2**40)),
     "its header claims 1,099,511,627,776 tensors"),
    (lambda p: patch(p, lambda r: r.tensors[0].field.parts[4].__setitem__(0, 99)),
     "a tensor has type id 99, which this version of the gguf package does not know"),
])
def test_a_damaged_gguf_file_is_one_error_naming_it(chat_gguf, damage, message):
    damage(chat_gguf)
    with pytest.raises(ValueError, match=re.escape(f"{chat_gguf}: ") + ".*" + re.escape(message)
                       if "not a GGUF" not in message else re.escape(f"{chat_gguf} {message}")):
        read_gguf(chat_gguf)
    with pytest.raises(ValueError, match=re.escape(str(chat_gguf))):
        load_chat_model(chat_gguf)


@pytest.mark.parametrize("damage, message", [
    (dict(bos=5000), "its tokenizer.ggml.bos_token_id is 5000, but its tokens are numbered 0 to 260"),
    (dict(eos=261), "its tokenizer.ggml.eos_token_id is 261"),
    (dict(tokens=["▁the" if i == 97 else t for i, t in enumerate(BYTES + ["he", "Ġt"] + SPECIALS)]),
     "token 97: '▁the' is not spelled in GPT-2's byte characters (bytes_to_unicode): this is not a byte-level "
     "BPE vocabulary"),
    (dict(merges=["h e", "Ġt"]), "merge 1 ('Ġt') is not two tokens separated by one space"),
    (dict(merges=["h e", "Ġ ▁"]), "merge 1 ('Ġ ▁'): '▁' is not spelled in GPT-2's byte characters"),
    (dict(vocab_size=200), "its tokenizer has 261 tokens, but its model embeds only 200"),
])
def test_a_gguf_tokenizer_that_cannot_be_this_model_s_is_one_error_naming_the_file(tmp_path, damage, message):
    path = tmp_path / "odd.gguf"
    write_chat_gguf(path, **damage)
    with pytest.raises(ValueError, match=re.escape(f"{path}: {message}")):
        load_chat_model(path)


def test_tokenizer_errors_name_the_file_not_the_reader_object(chat_gguf):
    reader = gguf.GGUFReader(chat_gguf)
    del reader.fields["tokenizer.ggml.merges"]
    with pytest.raises(ValueError, match=re.escape(f"{chat_gguf} has no 'tokenizer.ggml.merges'")):
        BPETokenizer.from_gguf(reader)


def llama_folder(tmp_path) -> tuple:
    """A tiny Hugging Face Llama folder whose weights are in two shards, and its config."""
    folder = tmp_path / "llama"
    LlamaModel(LlamaConfig(vocab_size=64, context_length=32, n_layer=2, n_head=2, n_kv_head=1, n_embd=16,
                           ffn_hidden=32, rope_theta=10000.0, rope_scaling=None)).save_pretrained_hf(folder)
    return folder


def shard(folder, weight_map: dict | str) -> None:
    """Split model.safetensors into two shards and write an index (`weight_map`, or a text in its place)."""
    from safetensors.torch import load_file

    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[::2]}, folder / "a.safetensors")
    save_file({n: tensors[n] for n in names[1::2]}, folder / "b.safetensors")
    if isinstance(weight_map, dict):
        weight_map = json.dumps({"weight_map": {n: weight_map.get(n, "a.safetensors" if i % 2 == 0 else "b.safetensors")
                                                for i, n in enumerate(names)}})
    (folder / "model.safetensors.index.json").write_text(weight_map)
    return names


def test_a_sharded_hugging_face_llama_folder_loads_its_shards_even_as_links_elsewhere(tmp_path):
    folder = llama_folder(tmp_path)
    whole = LlamaModel.from_pretrained_hf(folder).state_dict()
    shard(folder, {})
    assert safetensors_files(folder) == [folder / "a.safetensors", folder / "b.safetensors"]
    (tmp_path / "blobs").mkdir()                               # the Hugging Face cache: files link to its blobs
    (folder / "a.safetensors").rename(tmp_path / "blobs" / "a")
    (folder / "a.safetensors").symlink_to(tmp_path / "blobs" / "a")
    assert all(torch.equal(whole[n], t) for n, t in LlamaModel.from_pretrained_hf(folder).state_dict().items())


@pytest.mark.parametrize("elsewhere", ["../elsewhere/a.safetensors", "/etc/a.safetensors", "sub/../../a.safetensors"])
def test_a_shard_index_may_not_point_outside_its_folder(tmp_path, elsewhere):
    folder = llama_folder(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    names = shard(folder, {})
    (folder / "a.safetensors").rename(tmp_path / "elsewhere" / "a.safetensors")
    shard_map = json.loads((folder / "model.safetensors.index.json").read_text())
    shard_map["weight_map"][names[0]] = elsewhere
    (folder / "model.safetensors.index.json").write_text(json.dumps(shard_map))
    with pytest.raises(ValueError, match=re.escape(f"names the shard {elsewhere!r}, which is not a file in {folder}")):
        LlamaModel.from_pretrained_hf(folder)


@pytest.mark.parametrize("index, problem", [("{not json", "JSONDecodeError"), ("[1, 2]", "TypeError"),
                                            ('{"metadata": {}}', "KeyError")])
def test_a_shard_index_that_is_not_one_is_one_error(tmp_path, index, problem):
    folder = llama_folder(tmp_path)
    shard(folder, index)
    with pytest.raises(ValueError, match=re.escape("model.safetensors.index.json is not an index of shards") +
                       ".*" + problem):
        LlamaModel.from_pretrained_hf(folder)


def test_gguf_read_errors_are_values_errors_not_numpy_s(tmp_path):
    """The checks cost nothing on a whole file: the reader gives the same tensors as the gguf package's own."""
    path = tmp_path / "whole.gguf"
    write_chat_gguf(path)
    ours, theirs = read_gguf(path), gguf.GGUFReader(path)
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(ours.tensors, theirs.tensors))


# ---- Runs and Hugging Face GPT-2 folders whose settings do not describe their weights ---------------------

def damage_settings(out_dir, **model) -> None:
    """Change model settings in a run's config.json and in the settings saved in its newest checkpoint."""
    state_path = checkpoint_paths(out_dir, pointed_step(out_dir))[1]
    state = torch.load(state_path, weights_only=True)
    state["config"]["model"].update(model)
    torch.save(state, state_path)
    config = json.loads((out_dir / "config.json").read_text())
    config["model"].update(model)
    (out_dir / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def tiny_gpt_base(tmp_path_factory):
    torch.manual_seed(0)
    return GPTModel(GPTConfig(vocab_size=50257, context_length=64, n_layer=2, n_head=2, n_embd=16)).save_pretrained_hf(
        tmp_path_factory.mktemp("base"))


WRONG_SIZES = [(dict(n_embd=1_000_000), "checkpoint is from another config: transformer."),
               (dict(n_layer=100_000), "the number of blocks is 100,000 in the settings but 2 in the weights")]


@pytest.mark.parametrize("settings, problem", WRONG_SIZES)
def test_a_pretraining_run_whose_settings_were_damaged_is_refused_before_the_model_is_built(tmp_path, settings,
                                                                                            problem):
    train(TrainConfig(data="tinyshakespeare", tokenizer="char", max_steps=1, batch_size=2, eval_interval=1,
                      eval_iters=1, out_dir=str(tmp_path), model=dict(n_layer=2, n_head=2, n_embd=16,
                                                                       context_length=16)), log=lambda _: None,
          progress=False)
    damage_settings(tmp_path, **settings)
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path}: the run's settings do not describe its "
                                                         f"weights (") + ".*" + re.escape(problem)):
        load_run(tmp_path)


@pytest.mark.parametrize("settings, problem", WRONG_SIZES)
def test_a_finetuning_run_whose_settings_were_damaged_is_refused_before_the_model_is_built(tmp_path, tiny_gpt_base,
                                                                                           settings, problem):
    cfg = FinetuneConfig.for_task("instruct", data="instruction-data", base=str(tiny_gpt_base), batch_size=2,
                                  max_steps=1, eval_interval=1, eval_iters=1, lora_rank=2,
                                  out_dir=str(tmp_path / "instruct"))
    finetune(cfg, log=lambda _: None, progress=False)
    damage_settings(tmp_path / "instruct", **settings)
    with pytest.raises(CheckpointError, match=re.escape("the run's settings do not describe its weights (") + ".*" +
                       re.escape(problem)):
        load_finetuned(tmp_path / "instruct")


def test_a_hugging_face_gpt2_config_that_does_not_describe_its_weights_is_one_error(tmp_path, tiny_gpt_base):
    folder = tmp_path / "gpt2"
    shutil.copytree(tiny_gpt_base, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_embd": 1_000_000, "n_layer": 100_000}))
    problem = "the number of blocks is 100,000 in the settings"
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'model.safetensors'}: {problem}")):
        GPTModel.from_pretrained_hf(folder)


@pytest.mark.parametrize("change, problem", [
    (dict(num_hidden_layers=100_000), "the number of blocks is 100,000 in the settings"),
    (dict(hidden_size=1_000_000, num_attention_heads=2), "checkpoint is from another config")])
def test_a_hugging_face_llama_config_that_does_not_describe_its_weights_is_one_error(tmp_path, change, problem):
    folder = llama_folder(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    del config["head_dim"]
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=re.escape(f"{folder}: {problem}")):
        LlamaModel.from_pretrained_hf(folder)


@pytest.mark.parametrize("change, problem", [
    (dict(num_attention_heads="8"), "its num_attention_heads: must be a positive int, got '8'"),
    (dict(num_attention_heads=0), "its num_attention_heads: must be a positive int, got 0"),      # was 1 / 0
    (dict(hidden_size=0), "its hidden_size: must be a positive int, got 0"),
    (dict(num_key_value_heads=3), "its num_key_value_heads: "),
    (dict(head_dim=4), "head_dim=4 (LlamaModel's is hidden_size / heads)"),
])
def test_a_hugging_face_llama_config_with_a_bad_size_names_the_setting_as_the_file_does(tmp_path, change, problem):
    folder = llama_folder(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'config.json'}: ") + ".*" + re.escape(problem)):
        LlamaModel.from_pretrained_hf(folder)


@pytest.mark.parametrize("text, problem", [("{", "config.json: Expecting property name"),
                                           ('{"model_type": "llama"}', "config.json has no 'vocab_size'")])
def test_a_hugging_face_llama_config_that_cannot_be_read_is_one_error_naming_it(tmp_path, text, problem):
    folder = llama_folder(tmp_path)
    (folder / "config.json").write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{folder}/{problem}")):
        LlamaModel.from_pretrained_hf(folder)
