"""What a run leaves on disk and reads back: model directories (`model_dir`), training checkpoints with their
manifests and the rules of a resume (`checkpoints`, `resume_check`), and the Hugging Face export (`export`)."""
