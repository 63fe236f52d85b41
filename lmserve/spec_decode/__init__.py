"""Speculative decoding: proposers of draft tokens (n-gram prompt lookup, a draft model) and the
per-step metadata the rejection sampler (lmserve/sample/rejection_sampler.py) verifies them with.

Flow of one step (vLLM V1's): the scheduler schedules a request's last sampled token plus the
drafts proposed for it last step, under the same token budget; the runner computes target logits
at every draft position plus the last, the rejection sampler emits 1..k+1 tokens, the proposer
drafts the next k from the updated tokens, and the scheduler rolls `num_computed_tokens` back
by the number of drafts rejected.
"""
