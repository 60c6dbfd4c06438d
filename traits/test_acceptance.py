"""Acceptance checks for persona vectors: ``pytest traits/ --trait sycophantic``.

The four checks (score gap, norm peak, eval-split projection AUROC, reference cosine) live in the
package, ``harness.acceptance``, so any project that installs persona-harness runs them with this
same one-line module in its own traits folder. Trait-local tests can sit next to it.
"""

from harness.acceptance import *  # noqa: F401,F403
