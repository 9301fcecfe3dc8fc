"""Reading and writing checkpoints: HF directories, LAVIS files, BERT and separate towers, through
the models' name tables, strictly (every key accounted for)."""
