"""transformers-facing pieces of the patch: the attention function transformers calls
(``attention``), where the sink set sits in each call (``sink_location``) and the residual-clip
hook (``residual_clip``). One module per concern, as transformers' own ``integrations`` package
keeps one module per attention backend."""
