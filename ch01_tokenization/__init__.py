"""ch01_tokenization: see the chapter notebook."""
