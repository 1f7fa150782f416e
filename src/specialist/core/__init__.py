"""The neutral core: what every stage agrees on (what counts as a right answer, intervals, the retrieval index and
the cheapest baselines). It imports no stage (data/, train/, evaluate/, deploy/); every stage may import it."""
