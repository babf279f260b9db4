"""ch04_pretraining: see the chapter notebook."""
