"""ch02_attention: see the chapter notebook."""
