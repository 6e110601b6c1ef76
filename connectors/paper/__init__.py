"""The paper exchange: order intents and market data in, Binance-shaped user-data events out.

Only the engine lives here (`engine.py`, pure and deterministic). It runs inside the Faust worker, in the risk
agent (`streams/risk/paper_desk.py`, switched by PERPFLOW_PAPER_TRADING), which applies each bar just before
deciding the signal of that bar: fills follow event time whatever the replay speed, so backtests are
deterministic. There is deliberately no paper connector reading `orders` over Kafka: its fills would race the
replay, and next to the worker's it would fill every order twice."""
