"""A byte-level BPE tokenizer built in-process (no network), for tests that need real text ids."""


def make_tiny_tokenizer(texts=("the quick brown fox jumps over the lazy dog",) * 5, specials=("<eos>",)):
    """A byte-level BPE tokenizer (at most 300 entries, `specials` first, "<eos>" the end token)
    trained in-process on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=list(specials))
    tk.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")
