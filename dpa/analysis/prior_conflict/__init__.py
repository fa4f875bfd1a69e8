"""A controlled language-prior-conflict benchmark that runs on a CPU.

A tiny LLM is pre-trained on a language of style A (sentences such as "the
picture shows a red circle at the top ." and chats that answer questions by
copying words from their context); the alignment captions are in a
conflicting style B ("[ top ] circle / red .": same content words, other
order and punctuation); the instruction data and the evaluation questions are
in style A again. Vanilla alignment spends the projector on style B; DPA's
proxy learns style B first, so the projector can carry the image. See
docs/prior_conflict.md and ``tools/prior_conflict.py``.
"""
