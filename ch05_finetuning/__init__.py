"""ch05_finetuning: see the chapter notebook."""
