"""resta_fast: put safety back into fine-tuned language models (RESTA, ACL 2024).

    θ_restored = θ_finetuned + β · (θ_aligned − θ_unaligned)

optionally after DARE drop-and-rescale of the fine-tune delta. See README.md.
"""

__version__ = "0.1.0"
