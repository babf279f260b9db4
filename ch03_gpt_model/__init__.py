"""ch03_gpt_model: see the chapter notebook."""
