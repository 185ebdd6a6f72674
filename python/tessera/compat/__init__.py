# SPDX-License-Identifier: Apache-2.0
"""Drop-in replacements with the signatures and semantics of the libraries people already call:
tessera.compat.flash_attn (flash_attn 2.x), tessera.compat.sdpa (torch's
scaled_dot_product_attention, and patch() to route it to tessera) and tessera.compat.fla
(flash-linear-attention)."""
