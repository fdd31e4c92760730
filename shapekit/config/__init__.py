"""The config: TOML → validated, typed objects (`load`), its [bypass], [[mark]] and limits (`rules`), and the
values they hold (`units`: rates, sizes, durations; `addresses`: hosts and ports). Every bad input is found here."""
