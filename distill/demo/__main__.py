"""``python -m distill.demo``: the MLM demo (``make demo``)."""

from distill.demo.mlm import main

raise SystemExit(main())
