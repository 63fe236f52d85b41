"""Structured outputs: constrain what a request may generate (a JSON Schema, any JSON object, a
regex, one of several strings, an EBNF or Lark grammar), as vLLM V1 does.

    front-end   validate.py    the schema / regex / grammar parses (a 400 naming the field)
                                — no tokenizer needed, cheap; nothing is compiled here
    EngineCore  backend.py     the interface: compile a grammar for the vocabulary, then a
                               per-request matcher that fills bitmask rows, accepts tokens and
                               rolls back
                xgrammar_backend.py   the default implementation (xgrammar)
                llguidance_backend.py   the other (llguidance; --structured-outputs-backend
                               guidance)
                lmserve/core/structured_output.py   the manager: compiles in a thread pool,
                               caches by grammar text, builds one bitmask per step
    worker      lmserve/sample/grammar.py   applies the bitmask to the logits on the device

Nothing here is imported for an unconstrained request.
"""
