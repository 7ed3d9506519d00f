"""Real federation on Flower (optional extra `collabedit[flower]`).

config.py and engine.py hold the settings and the round logic and import nothing from Flower;
server_app.py / client_app.py are the Flower apps, codec.py moves engine objects in Flower
records, secagg.py is the SecAgg+ mode, simulation.py runs everything on Flower's simulation
engine, scaffold.py writes a ready Flower app folder, cli.py is `collabedit federate`.
The rest of collabedit never imports this package.
"""
