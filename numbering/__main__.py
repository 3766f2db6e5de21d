from numbering.cli import main

main(prog_name="numbering")
