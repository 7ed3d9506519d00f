"""Privacy audit of what CollabEdit clients send (P_i = R_i K_i^T, S_i = K_i K_i^T).

* `attacks`: the dictionary attack of a curious server that holds the base model (membership of
  candidate subjects from S, the edit itself from P);
* `inversion`: a GEIA-style decoder that generates request text from a key, applied to K and to
  S's eigenvectors (the paper's Figure 5);
* the mitigations a client can apply to its own P_i, S_i before sending (cover keys, Gaussian
  noise) are part of the client round: `collab/mitigations.py`.

Measured by `collabedit bench privacy`; threat model and numbers in docs/privacy.md.
"""
