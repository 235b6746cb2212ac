"""
Qwen3's tokenizer as the tests, benchmarks and the GPU check need it offline: its size (151,669 entries) and special
ids, built without a download. The stop ids of Base and chat models differ, which is what the EOS merging is about.
And the small random-weight Qwen3 models of the CPU benchmarks.
"""
BASE_EOS, CHAT_EOS = 151643, 151645  # Qwen3: <|endoftext|> (Base models, and pad), <|im_end|> (chat models)
QWEN3_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|special_{i}|>" for i in range(21)] + [
    "<think>", "</think>"]  # ids 151643..151668, as in Qwen3's tokenizer
QWEN3_TEMPLATE = (  # ChatML as Qwen3's template writes it, with its enable_thinking switch
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def qwen3_sized_tokenizer(eos_token, chat_template=True):
    """
    A tokenizer with Qwen3's size and special ids, built offline: 151,643 ordinary entries (one per printable
    character first, then fillers), then 26 special tokens from 151643 (<|endoftext|>, the Base EOS and pad) through
    151645 (<|im_end|>, the chat EOS) to </think> at 151668; len 151,669.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    tokens = chars + [f"<f{i}>" for i in range(151643 - len(chars))] + QWEN3_SPECIAL
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<f0>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos_token, pad_token="<|endoftext|>",
                                        additional_special_tokens=QWEN3_SPECIAL[1:], padding_side="left")
    tokenizer.chat_template = QWEN3_TEMPLATE if chat_template else None
    assert len(tokenizer) == 151669 and tokenizer.convert_tokens_to_ids("<|im_end|>") == 151645
    return tokenizer


def random_qwen3(vocab, hidden, layers, seed, tied=False, eos=None, init_range=0.02):
    """
    A random-weight Qwen3ForCausalLM of the given width and depth, laid out as Qwen3's are (4 query and 2 key-value
    heads of hidden / 4, an MLP 3 x hidden wide), for the CPU benchmarks. eos: the stop id, which also becomes the pad
    id (as in Qwen3's Base models); None keeps the config's defaults. The weights depend on seed alone.
    """
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM
    stop_ids = {} if eos is None else dict(pad_token_id=eos, eos_token_id=eos, bos_token_id=None)
    config = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                         max_position_embeddings=1024, tie_word_embeddings=tied, initializer_range=init_range,
                         **stop_ids)
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config)
