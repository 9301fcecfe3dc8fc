"""Training for BLIP-2: stage 1 (ITC + ITM + ITG) and stage 2 (LM) losses (`losses`) and the pieces around them."""
