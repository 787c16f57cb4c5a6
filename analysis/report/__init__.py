"""The report: charts, the helpers its document uses, and rendering with Quarto or the fallback."""
