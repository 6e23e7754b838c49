"""The ``kv`` pass family: ``match`` finds each layer's attention, ``kv_pass`` plans and rewrites,
``builder`` emits the cache write/read and the new attention core."""
