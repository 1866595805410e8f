"""The ``brandcopy`` command line. Wiring only: every command calls one library function.

Each section below belongs to one area; heavy imports happen inside the commands so that
``brandcopy --help`` stays fast.
"""

import typer

app = typer.Typer(help="Brand-exclusive copywriting models: data, training, evaluation.", no_args_is_help=True)
data_app = typer.Typer(help="Generate, clean and export training data.", no_args_is_help=True)
train_app = typer.Typer(help="Training stages: sft, reward, dpo, grpo.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")


# --- brand and lint (brand.py, lint.py) ---------------------------------------------------


# --- data pipeline (llm.py, mockserver.py, datagen.py) ------------------------------------


# --- training, merge, doctor (train/*, doctor.py) -----------------------------------------


# --- evaluation and chat (evaluate.py, chat.py) -------------------------------------------


# --- demo (demo.py) -----------------------------------------------------------------------


if __name__ == "__main__":
    app()
