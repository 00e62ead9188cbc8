"""The pipeline that built the embedded reference pair (models/reference/): the corpus
(`corpus`), tokenizer and training of both architectures (`train_reference`), the copy probe
(`probe`) and the model card (`card`). Nothing here runs when serving; the runtime backends
are the modules one level up."""
