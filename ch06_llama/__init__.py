"""ch06_llama: see the chapter notebook."""
